"""CIFAR-10 from torchvision's on-disk format, checked before training.

The layout is the one `torchvision.datasets.CIFAR10(root, download=True)` writes (and the original
tarball unpacks to): `<dir>/cifar-10-batches-py/` holding `data_batch_1` .. `data_batch_5`,
`test_batch` and `batches.meta`, Python pickles of dicts with `data` (uint8 [N, 3072], each row the
1024 red, then green, then blue values of a 32x32 image, row-major) and `labels` (N ints in 0-9), and
`label_names` in the meta file. `<dir>` may also be the `cifar-10-batches-py` folder itself.

The reader is written here rather than taken from torchvision because torchvision's dataset checks
only md5 sums (so a wrong file is "not found or corrupted" with no word on which or why) and trusts
shapes and labels; ours names the file and what is wrong with it, and unpickles with an allow-list so
that `--data.dir` pointed at a stranger's file cannot run code. The result equals torchvision's
(`tests/test_cifar10_data.py` compares them pixel for pixel), except that images are [N, 3, 32, 32]
(channels first, as the device-resident splits want) rather than torchvision's [N, 32, 32, 3].
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from largebatch.data.mnist import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
LAYOUT = (f"expected <dir>/{FOLDER}/{{{','.join(TRAIN_FILES)},{TEST_FILE},{META_FILE}}}, pickled dicts with "
          f"'data' uint8 [N, 3072] and 'labels' N ints in 0-9")
GET_DATA = (f"pass --data.dir to a folder holding {FOLDER} "
            f"(torchvision.datasets.CIFAR10(root, download=True) writes it under root)")

# Per-channel mean and standard deviation of the 50,000 training images, pixel values in [0, 1]:
# `channel_stats(load_cifar10(dir).train_images)`, i.e. mean and population std over all
# 50000 * 32 * 32 pixels of each channel (not the average of per-image stds, which gives the
# often-quoted but different (0.2023, 0.1994, 0.2010)). tests/test_cifar10_data.py recomputes them
# from a real copy when LARGEBATCH_CIFAR10_DIR points at one.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class CIFAR10:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N], for train and test, and class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: str


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's pickles hold: builtins and numpy arrays, as numpy pickles them with
    any protocol (bytes written by Python 3 with protocol <= 2 go through `_codecs.encode`)."""

    ALLOWED = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
               *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
                 for name in ("_reconstruct", "scalar")),
               *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}  # protocol 5

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, object]:
    """The dict in one CIFAR pickle, keys as str (Python 2 pickles give bytes keys); DataError otherwise."""
    if not path.is_file():
        raise DataError(f"{path} not found: {LAYOUT}; {GET_DATA}")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, or a pickle of something else
        raise DataError(f"cannot unpickle {path} ({type(e).__name__}: {e}): {LAYOUT}; re-download it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a dict: {LAYOUT}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 3, 32, 32]) and labels (int64 [N]) of one batch file, checked to agree."""
    d = read_pickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} has keys {sorted(d)}, no 'data' and 'labels': {LAYOUT}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {desc}, not uint8 [N, 3072]: {LAYOUT}")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.zeros((0, 0), np.int64)  # reported as a wrong shape below
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but 'labels' has shape {list(labels.shape)}: {LAYOUT}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}, CIFAR-10 has 0-9: {LAYOUT}")
    return data.reshape(-1, 3, 32, 32), labels


def find_folder(root: Path) -> Path:
    """`root/cifar-10-batches-py`, or `root` itself if it holds the batch files; DataError otherwise."""
    if not root.is_dir():
        raise DataError(f"--data.dir {root} is not a directory: {GET_DATA}")
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / TEST_FILE).exists() or root.name == FOLDER:
        return root
    raise DataError(f"{root} holds no {FOLDER} folder: {LAYOUT}; {GET_DATA}")


def read_classes(path: Path) -> list[str]:
    """The ten class names of `batches.meta`."""
    names = read_pickle(path).get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DataError(f"{path}: 'label_names' is {names!r:.80}, not a list of {NUM_CLASSES} names: {LAYOUT}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(data_dir: str | Path | None) -> CIFAR10:
    """CIFAR-10 from `data_dir` (the folder holding cifar-10-batches-py, or that folder); DataError otherwise."""
    if not data_dir:
        raise DataError(f"CIFAR-10 needs its files: {GET_DATA}")
    folder = find_folder(Path(data_dir).expanduser())
    classes = read_classes(folder / META_FILE)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    return CIFAR10(train_images=np.concatenate([x for x, _ in train]),
                   train_labels=np.concatenate([y for _, y in train]),
                   test_images=test_images, test_labels=test_labels, classes=classes, source=str(folder))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of uint8 [N, C, H, W] images scaled to [0, 1].

    Computed exactly from each channel's 256-bin histogram, so 50,000 images need no float copy.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        mean = float(hist @ values / hist.sum())
        means.append(mean)
        stds.append(float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum())))
    return tuple(means), tuple(stds)
