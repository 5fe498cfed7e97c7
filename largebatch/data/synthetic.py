"""Synthetic images for throughput measurement: random uint8 pixels and labels, held on the device.

The pixels carry no signal, so accuracy stays at chance; what they measure is the speed of the training
step with the real input shape and no decoding cost, as MLPerf's and NVIDIA's synthetic-data benchmarks do.
"""

from __future__ import annotations

import torch


def synthetic_arrays(n: int, channels: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` uint8 images [n, channels, size, size] and int64 labels in [0, classes), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images, labels
