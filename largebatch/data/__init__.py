"""Data sets behind one interface (`largebatch.data.source`): device-held splits or streamed datasets.

`load_data(cfg, device, ...)` returns a `Data`: the training source, the evaluation sources (`val` when
asked for, `test`), the keywords the model is built with (classes, channels, image size; vocab_size and block_size
for text), the default task and files for the run directory. `shakespeare` is a character-level corpus
(`largebatch.data.text`, whose `char_corpus` builds the same from a user's folder of .txt files).
`cfg.name` is a built-in data set (`DataConfig.BUILTIN`) or a user's: `module.path:callable` or a plug-in name
returning `Splits`, loaded by `load_user_data` (`largebatch.data.user`), which Python callers use directly.
"""

from __future__ import annotations

import numpy as np
import torch

from largebatch.config import PYTHON, ConfigError, DataConfig
from largebatch.data.device import (DeviceEval, DeviceSplit, DeviceTrain, EpochStream, eval_shard, eval_shard_size,
                                    rank_share)
from largebatch.data.mnist import MEAN, STD, DataError, load_mnist
from largebatch.data.source import Data, EvalSource, TrainSource
from largebatch.data.stream import resolve_workers
from largebatch.data.text import char_corpus, load_text
from largebatch.data.user import Splits, load_user_data, splits_by_name

__all__ = ["Data", "DataError", "DeviceEval", "DeviceSplit", "DeviceTrain", "EpochStream", "EvalSource", "Splits",
           "TrainSource", "char_corpus", "eval_shard", "eval_shard_size", "load_data", "load_splits", "load_user_data",
           "rank_share"]


def _cut(cfg: DataConfig, tx: torch.Tensor, ty: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor,
         source: str) -> dict:
    """Train / val / test tensors: val is the last `val_size` training images, then the limits apply.

    A split that would be empty is an error naming its cause: the data (`source`) or data.val_size.
    """
    n = len(ty)
    for split, size in (("training", n), ("test", len(sy))):
        if not size:
            raise DataError(f"the {split} split of {source} holds no images: point --data.dir at the full data set")
    if cfg.val_size >= n:
        raise ConfigError(f"data.val_size = {cfg.val_size} leaves no training images: {source} has {n} training "
                          f"images, so give a val_size below {n}")
    splits = {}
    if cfg.val_size:
        splits["val"] = (tx[n - cfg.val_size:], ty[n - cfg.val_size:])
        tx, ty = tx[: n - cfg.val_size], ty[: n - cfg.val_size]
    if cfg.train_limit:
        tx, ty = tx[: cfg.train_limit], ty[: cfg.train_limit]
    if cfg.test_limit:
        sx, sy = sx[: cfg.test_limit], sy[: cfg.test_limit]
    return {"train": (tx, ty), **splits, "test": (sx, sy)}


def _arrays(cfg: DataConfig, seed: int) -> tuple[dict, tuple, tuple, int]:
    """(train/val/test tensors, mean, std, classes) of a device-held data set."""
    t = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"]))  # noqa: E731  (copies read-only arrays)
    if cfg.name == "mnist":
        d = load_mnist(cfg.dir)
        return _cut(cfg, t(d.train_images), t(d.train_labels), t(d.test_images), t(d.test_labels), d.source), \
            (MEAN,), (STD,), 10
    if cfg.name == "cifar10":
        from largebatch.data import cifar10
        d = cifar10.load_cifar10(cfg.dir)
        return _cut(cfg, t(d.train_images), t(d.train_labels), t(d.test_images), t(d.test_labels), d.source), \
            cifar10.MEAN, cifar10.STD, 10
    if cfg.name == "synthetic":
        from largebatch.data.synthetic import synthetic_arrays
        args = (cfg.synthetic_examples, 3, cfg.image_size, cfg.synthetic_classes)
        (tx, ty), (sx, sy) = synthetic_arrays(*args, seed=seed), synthetic_arrays(*args, seed=seed + 1)
        return _cut(cfg, tx, ty, sx, sy, "the synthetic data"), (0.5,) * 3, (0.25,) * 3, cfg.synthetic_classes
    raise ConfigError(f"data.name = {cfg.name!r} is not a device-held data set")


def load_splits(cfg: DataConfig, device: torch.device, channels_last: bool = False, seed: int = 0
                ) -> dict[str, DeviceSplit]:
    """The device-held splits (`train`, optional `val`, `test`) of mnist, cifar10 or synthetic data."""
    splits, mean, std, _ = _arrays(cfg, seed)
    return {k: DeviceSplit(x, y, mean, std, device, channels_last) for k, (x, y) in splits.items()}


def load_data(cfg: DataConfig, device: torch.device, channels_last: bool = False, seed: int = 0) -> Data:
    """The data set `cfg.name` as training and evaluation sources on `device`; errors before any work."""
    if cfg.name == PYTHON:
        raise ConfigError("data.name = 'python': this run's data was given from Python, so it cannot be loaded "
                          "from the config: pass it again, largebatch.train(cfg, data=..., resume=True)")
    if cfg.name not in DataConfig.BUILTIN:
        return load_user_data(splits_by_name(cfg, seed), cfg, device, channels_last, seed)
    if cfg.name == "shakespeare":
        return load_text(cfg, device, seed)
    if cfg.name in ("imagenet", "cifar10") and cfg.dir is None:
        raise DataError(f"data.name = {cfg.name} needs --data.dir: " + (
            "the folder holding train/<class>/*.JPEG and val/<class>/*.JPEG" if cfg.name == "imagenet" else
            "the folder holding cifar-10-batches-py (torchvision.datasets.CIFAR10(root, download=True) writes it)"))
    if cfg.name == "imagenet":
        from largebatch.data.imagefolder import load_imagefolder
        return load_imagefolder(cfg.dir, device, seed=seed, image_size=cfg.image_size,
                                num_workers=resolve_workers(cfg.workers), channels_last=channels_last)
    splits, mean, std, classes = _arrays(cfg, seed)
    dev = {k: DeviceSplit(x, y, mean, std, device, channels_last) for k, (x, y) in splits.items()}
    train = DeviceTrain(dev.pop("train"), seed, cfg.crop_padding, cfg.flip)
    x = train.split.images
    return Data(train, {k: DeviceEval(v) for k, v in dev.items()},
                {"num_classes": classes, "in_channels": x.shape[1], "image_size": x.shape[-1]})
