"""Data sets as device-resident splits (`train`, optional `val`, `test`)."""

from __future__ import annotations

import torch

from largebatch.config import ConfigError, DataConfig
from largebatch.data.device import DeviceSplit, EpochStream, eval_shard, rank_share
from largebatch.data.mnist import MEAN, STD, load_mnist

__all__ = ["DeviceSplit", "EpochStream", "eval_shard", "load_splits", "rank_share"]


def load_splits(cfg: DataConfig, device: torch.device, channels_last: bool = False) -> dict[str, DeviceSplit]:
    """Load `cfg.name` and cut the train / val / test splits the config asks for.

    The validation split is the last `val_size` training images (the 55K/5K split with 5000);
    `train_limit` then keeps the first N of what remains, `test_limit` the first N test images.
    """
    d = load_mnist(cfg.dir)
    tx, ty = torch.from_numpy(d.train_images.copy()), torch.from_numpy(d.train_labels)
    n = len(ty)
    if cfg.val_size >= n:
        raise ConfigError(f"data.val_size = {cfg.val_size} leaves no training images (the training set has {n})")
    splits = {}
    if cfg.val_size:
        splits["val"] = (tx[n - cfg.val_size:], ty[n - cfg.val_size:])
        tx, ty = tx[: n - cfg.val_size], ty[: n - cfg.val_size]
    if cfg.train_limit:
        tx, ty = tx[: cfg.train_limit], ty[: cfg.train_limit]
    sx, sy = torch.from_numpy(d.test_images.copy()), torch.from_numpy(d.test_labels)
    if cfg.test_limit:
        sx, sy = sx[: cfg.test_limit], sy[: cfg.test_limit]
    splits = {"train": (tx, ty), **splits, "test": (sx, sy)}
    return {k: DeviceSplit(x, y, MEAN, STD, device, channels_last) for k, (x, y) in splits.items()}
