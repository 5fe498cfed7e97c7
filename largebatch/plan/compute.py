"""Compute time of a training step: FLOPs counted by PyTorch, a device's peak and its efficiency at a batch.

The FLOPs of one example's forward and backward pass come from `torch.utils.flop_counter.FlopCounterMode` (matrix
products and convolutions; the elementwise and normalisation layers are not counted, which is what the efficiency
absorbs) on a model built on the meta device: no memory, no arithmetic, well under a second for ResNet-50.

A chip holding b examples per step takes

    t(b) = F (b + h) / (P e)        equivalently  efficiency(b) = e b / (b + h)

for F FLOPs per example, peak P, sustained efficiency e at large batch and half-efficiency batch h: a fixed
per-step cost (kernel launches, small-tensor work) of F h / (P e) on top of the per-example cost. It is the same
straight line t(b) = a + c b that `measure_step_times` fits to timings on the local device (a = F h / (P e),
c = F / (P e)), the roofline-style model of Williams et al. 2009 with an overhead term.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn


def count_flops(build: Callable[[], nn.Module], example: Callable[[int], torch.Tensor],
                loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, int]:
    """(FLOPs of forward + backward per example, parameter count) of the model `build()` makes, on the meta device.

    `example(n)` returns a batch of n inputs (created under the meta device); the count uses a batch of 2 and
    divides by 2, so batch-size-independent work (none, for the usual layers) is not mistaken for per-example work.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        x = example(2)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        (loss(out) if loss is not None else out.float().sum()).backward()
    return counter.get_total_flops() / 2, sum(p.numel() for p in model.parameters())


def step_compute_time(flops_per_example: float, per_chip_batch: float, peak_flops: float, efficiency: float,
                      half_batch: float) -> float:
    """Seconds of forward + backward for `per_chip_batch` examples on one chip: F (b + h) / (P e) (module docstring)."""
    return flops_per_example * (per_chip_batch + half_batch) / (peak_flops * efficiency)


def fit_line(batches: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares t(b) = a + c b through the measured (batch, seconds) points: (a, c), a clamped at >= 0."""
    slope, intercept = statistics.linear_regression(batches, seconds)
    return max(intercept, 0.0), slope


def measure_step_times(model: nn.Module, example: Callable[[int], torch.Tensor], batches: Sequence[int],
                       repeats: int = 3, device: torch.device | None = None) -> list[float]:
    """Median seconds of one forward + backward at each micro-batch size in `batches` on `device` (after one warm-up
    step per size). Real arithmetic: keep the model and the batches small on a CPU."""
    device = device or torch.device("cpu")
    model = model.to(device).train()
    times = []
    for b in batches:
        x = example(b).to(device)
        samples = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first is the warm-up
                samples.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        times.append(statistics.median(samples))
    return times
