"""ImageNet-style folders streamed through DataLoader workers.

Layout: `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG` (any extension torchvision's
ImageFolder accepts), the val folders named like the train ones: the usual preparation of ILSVRC-2012
with its val images moved into per-wnid folders. The layout is checked before any work, with one-line
errors that name the folder (`scan_imagefolder`); files are listed by torchvision's `find_classes` and
`make_dataset`, so classes and their order are exactly torchvision ImageFolder's.

Workers read a file's bytes, decode them with `torchvision.io.decode_image` (libjpeg-turbo for JPEG,
also PNG, WebP, GIF; grayscale and CMYK come out RGB), falling back to PIL for anything else, augment
the uint8 image and return it as uint8: a quarter of the bytes of float32 through shared memory, pinned
memory and the host-to-device copy. Normalisation with the ImageNet mean and std (and channels_last)
happens on the device.

Training (`FolderTrain`) follows the protocol of `largebatch.data.source`: the global batch of step s is
`EpochStream(n, seed).batch(s, B)`, each rank keeps its `rank_share`, and the RandomResizedCrop and
flip of the example at position p of that global batch are drawn from a seed that depends only on
(seed, s, p), so any number of ranks, any number of workers and a resumed run see identical pixels.
One DataLoader iterator lives across steps: its batch sampler yields the micro-batches of steps
s, s+1, ... forever, so workers decode the next step's images while the model trains on this one.

ImageNet's val set is the held-out set results are reported on, so `load_imagefolder` names it "test"
(the trainer reports `test_accuracy`); there is no separate validation split.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from largebatch.config import ConfigError
from largebatch.data.device import EpochStream, eval_shard, rank_share
from largebatch.data.mnist import DataError
from largebatch.data.source import Data, augment_generator

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a dependency here;
# they still work, and warning once per worker and per image would only bury real warnings.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FolderSplit:
    """The images of one split folder: paths relative to `root` (bytes, in a numpy array rather than a list
    of str, so that worker processes reading them do not copy the pages the list's refcounts live in)
    and labels, in torchvision ImageFolder's order."""

    root: str
    classes: list[str]
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())


def scan_split(folder: Path, classes: list[str] | None = None) -> FolderSplit:
    """List `folder/<class>/*` with torchvision; DataError if it has no class folders, a class folder has
    no images, or its classes differ from `classes` (those of the train folder)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory: expected {LAYOUT}")
    try:
        found, class_to_idx = find_classes(folder)
    except FileNotFoundError:
        raise DataError(f"{folder} has no class folders: expected {LAYOUT}") from None
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(f"{folder} has {len(found)} class folders but the train folder has {len(classes)} "
                        f"(missing: {', '.join(missing[:5]) or 'none'}; "
                        f"not in train: {', '.join(extra[:5]) or 'none'}): "
                        f"expected {LAYOUT} with the same class folders")
    samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    labels = np.fromiter((c for _, c in samples), dtype=np.int64, count=len(samples))
    empty = [c for c, count in zip(found, np.bincount(labels, minlength=len(found))) if count == 0]
    if empty:
        raise DataError(f"{folder / empty[0]} holds no images ({', '.join(IMG_EXTENSIONS)}), nor do "
                        f"{len(empty) - 1} other class folders: expected {LAYOUT}")
    paths = np.array([os.path.relpath(p, folder).encode() for p, _ in samples], dtype=np.bytes_)
    return FolderSplit(str(folder), found, paths, labels)


def scan_imagefolder(root: str | Path | None) -> tuple[FolderSplit, FolderSplit]:
    """The train and val splits of `root`, the whole layout checked first; DataError naming what is wrong."""
    if not root:
        raise DataError(f"ImageNet-style data needs --data.dir: expected {LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data.dir {root} is not a directory: expected {LAYOUT}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is not a directory: expected {LAYOUT}")
    train = scan_split(root / "train")
    return train, scan_split(root / "val", train.classes)


def decode(path: str) -> Tensor:
    """The image at `path` as uint8 RGB [3, H, W]: torchvision's decoders, else PIL; DataError naming the file."""
    try:
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        img = decode_image(raw, mode=ImageReadMode.RGB)
    except RuntimeError as tv_error:  # a format torchvision does not decode (BMP, TIFF, ...) or a bad file
        try:
            with Image.open(path) as im:
                return v2.functional.pil_to_tensor(im.convert("RGB"))
        except Exception as e:
            first = str(tv_error).strip().splitlines()[-1]
            raise DataError(f"cannot decode image {path} (torchvision: {first}; PIL: {type(e).__name__}: {e}): "
                            f"replace or delete the file") from None
    if img.dim() == 4:  # an animated GIF: its first frame
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = v2.functional.to_dtype(img, torch.uint8, scale=True)
    return img


class FolderImages(Dataset):
    """Decoded, transformed uint8 images of a split, indexed by (index, example seed or None).

    With a seed, the transform's random draws come from the CPU generator seeded with it (the caller's
    generator state is restored afterwards, so this is safe in the main process with num_workers=0).
    """

    def __init__(self, split: FolderSplit, transform: v2.Transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, int]:
        index, seed = key
        img = decode(self.split.path(index))
        if seed is None:
            img = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                img = self.transform(img)
        return img.contiguous(), int(self.split.labels[index])


def train_transform(image_size: int) -> v2.Transform:
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def eval_transform(image_size: int) -> v2.Transform:
    """Resize the short side to 256/224 of the crop (256 for 224), then centre-crop: the standard protocol."""
    return v2.Compose([v2.Resize(round(256 * image_size / 224), antialias=True), v2.CenterCrop(image_size)])


class StepSampler:
    """Batch sampler: the micro-batches of steps start, start+1, ... forever, each a list of
    (index, example seed); `plan` = (start, global_batch, rank, world_size, micro_batch) is read
    when an iterator is made."""

    def __init__(self, n: int, seed: int) -> None:
        self.stream, self.seed = EpochStream(n, seed, torch.device("cpu")), seed
        self.plan: tuple[int, int, int, int, int] = (0, 1, 0, 1, 1)

    def step(self, step: int, global_batch: int, rank: int, world_size: int,
             micro_batch: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of step `step`. The seed of an example is entry p of a vector drawn
        from `augment_generator(seed, step)`, p its position in the global batch."""
        index = rank_share(self.stream.batch(step, global_batch), rank, world_size)
        seeds = torch.randint(0, 2**62, (global_batch,), generator=augment_generator(self.seed, step))
        pairs = list(zip(index.tolist(), rank_share(seeds, rank, world_size).tolist()))
        return [pairs[i: i + micro_batch] for i in range(0, len(pairs), micro_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, *shape = self.plan
        return self._forever(start, *shape)

    def _forever(self, step: int, *shape: int) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield from self.step(step, *shape)
            step += 1


class ToDevice:
    """uint8 batches to `device` (non-blocking from pinned memory), normalised there to float32."""

    def __init__(self, device: torch.device, channels_last: bool) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) / std

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format).float()
        return x.mul_(self.scale).add_(self.shift), labels.to(self.device, non_blocking=True)


def default_workers() -> int:
    """Up to 8 workers per process, sharing this machine's cores with the other local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def worker_errors(batches: Iterator) -> Iterator:
    """`batches` of a DataLoader, with a DataError raised in a worker re-raised as the worker's one-line message
    (torch puts the worker's traceback into the message it re-raises)."""
    try:
        yield from batches
    except DataError as e:
        text = str(e).strip()
        _, found, message = text.splitlines()[-1].partition("DataError: ")
        if "Original Traceback" not in text or not found:
            raise
        raise DataError(message) from None


def make_loader(dataset: Dataset, batch_sampler: object, device: torch.device, num_workers: int,
                prefetch_factor: int) -> DataLoader:
    """A DataLoader over (index, seed) lists with persistent workers, pinned memory on CUDA."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", prefetch_factor=prefetch_factor if num_workers else None,
                      persistent_workers=num_workers > 0)


class FolderTrain:
    """The training split as a TrainSource (see the module docstring)."""

    def __init__(self, split: FolderSplit, device: torch.device | str, seed: int = 0, image_size: int = 224,
                 num_workers: int | None = None, channels_last: bool = False, prefetch_factor: int = 2) -> None:
        self.device = torch.device(device)
        self.dataset = FolderImages(split, train_transform(image_size))
        self.sampler = StepSampler(len(split), seed)
        workers = default_workers() if num_workers is None else num_workers
        self.loader = make_loader(self.dataset, self.sampler, self.device, workers, prefetch_factor)
        self.to_device = ToDevice(self.device, channels_last)
        self._iterator: Iterator | None = None
        self._expected: tuple[int, ...] | None = None  # the call whose batches the iterator holds next

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def resident_bytes(self) -> int:
        return 0

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of step `step`'s global batch in micro-batches, from the live iterator if it is
        positioned at this step, else from a fresh one started here (first call, resume, changed shape)."""
        if not 0 < global_batch <= len(self):
            raise ConfigError(f"a global batch of {global_batch} needs 1 to {len(self)} training images "
                              f"({self.dataset.split.root} holds {len(self)})")
        return self._micro_batches((step, global_batch, rank, world_size, micro_batch))

    def _micro_batches(self, call: tuple[int, int, int, int, int]) -> Iterator[tuple[Tensor, Tensor]]:
        step, global_batch, _, world_size, micro_batch = call
        if self._iterator is None or self._expected != call:
            self.sampler.plan = call
            self._iterator = worker_errors(iter(self.loader))
        self._expected = None  # until all of this step's micro-batches have been taken from the iterator
        count = -(-(global_batch // world_size) // micro_batch)
        for i in range(count):
            images, labels = next(self._iterator)
            if i == count - 1:
                self._expected = (step + 1, *call[1:])
            yield self.to_device(images, labels)

    def example(self) -> tuple[Tensor, Tensor]:
        """The first training image, augmented with seed 0, as a batch of one on the device."""
        image, label = self.dataset[(0, 0)]
        return self.to_device(image[None], torch.tensor([label]))


class FolderEval:
    """An evaluation split (centre crops) as an EvalSource; ranks shard it with `eval_shard`."""

    def __init__(self, split: FolderSplit, device: torch.device | str, image_size: int = 224,
                 num_workers: int | None = None, channels_last: bool = False, prefetch_factor: int = 2) -> None:
        self.device = torch.device(device)
        self.dataset = FolderImages(split, eval_transform(image_size))
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.prefetch_factor = prefetch_factor
        self.to_device = ToDevice(self.device, channels_last)
        self._loader: tuple[tuple[int, int, int], DataLoader] | None = None  # kept for its persistent workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Rank `rank`'s padded shard in batches of at most `batch_size`: (images, labels, mask)."""
        index, valid = eval_shard(len(self), rank, world_size, torch.device("cpu"))
        key = (rank, world_size, batch_size)
        if self._loader is None or self._loader[0] != key:
            chunks = [[(i, None) for i in part.tolist()] for part in index.split(batch_size)]
            self._loader = key, make_loader(self.dataset, chunks, self.device, self.num_workers, self.prefetch_factor)
        for (images, labels), mask in zip(worker_errors(iter(self._loader[1])), valid.split(batch_size)):
            yield *self.to_device(images, labels), mask.to(self.device, non_blocking=True)


def load_imagefolder(root: str | Path | None, device: torch.device | str, seed: int = 0, image_size: int = 224,
                     num_workers: int | None = None, channels_last: bool = False, prefetch_factor: int = 2) -> Data:
    """Train and val of an ImageNet-style folder as `Data`, the layout checked first (`scan_imagefolder`);
    val is reported as "test" (see the module docstring).

    `num_workers` None: `default_workers()`; 0 decodes in the training process. Workers start at the first
    batch, not here.
    """
    train, val = scan_imagefolder(root)
    common = dict(image_size=image_size, num_workers=num_workers, channels_last=channels_last,
                  prefetch_factor=prefetch_factor)
    return Data(train=FolderTrain(train, device, seed=seed, **common),
                evals={"test": FolderEval(val, device, **common)},
                num_classes=len(train.classes), in_channels=3, image_size=image_size)
