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
s, s+1, ... forever, so workers decode the next step's images while the model trains on this one
(the sampler and that iterator are `largebatch.data.stream`'s, shared with a user's streamed Dataset).

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
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from largebatch.config import ConfigError
from largebatch.data.mnist import DataError
from largebatch.data.source import Data
from largebatch.data.stream import ShardStream, StepStream

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


class FolderTrain(StepStream):
    """The training split as a TrainSource (see the module docstring)."""

    def __init__(self, split: FolderSplit, device: torch.device | str, seed: int = 0, image_size: int = 224,
                 num_workers: int | None = None, channels_last: bool = False, prefetch_factor: int = 2) -> None:
        super().__init__(FolderImages(split, train_transform(image_size)), seed, device, num_workers, prefetch_factor)
        self.to_device = ToDevice(self.device, channels_last)

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of step `step`'s global batch in micro-batches, from the live iterator if it is
        positioned at this step, else from a fresh one started here (first call, resume, changed shape)."""
        if not 0 < global_batch <= len(self):
            raise ConfigError(f"a global batch of {global_batch} needs 1 to {len(self)} training images "
                              f"({self.dataset.split.root} holds {len(self)})")
        call = (step, global_batch, rank, world_size, micro_batch)
        return (self.to_device(images, labels) for images, labels in self._step_batches(call))

    def example(self) -> tuple[Tensor, Tensor]:
        """The first training image, augmented with seed 0, as a batch of one on the device."""
        image, label = self.dataset[(0, 0)]
        return self.to_device(image[None], torch.tensor([label]))


class FolderEval(ShardStream):
    """An evaluation split (centre crops) as an EvalSource; ranks shard it with `eval_shard`."""

    def __init__(self, split: FolderSplit, device: torch.device | str, image_size: int = 224,
                 num_workers: int | None = None, channels_last: bool = False, prefetch_factor: int = 2) -> None:
        super().__init__(FolderImages(split, eval_transform(image_size)), device, num_workers, prefetch_factor)
        self.to_device = ToDevice(self.device, channels_last)

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Rank `rank`'s padded shard in batches of at most `batch_size`: (images, labels, mask)."""
        for (images, labels), mask in self._shard_batches(rank, world_size, batch_size):
            yield *self.to_device(images, labels), mask


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
                keywords={"num_classes": len(train.classes), "in_channels": 3, "image_size": image_size})
