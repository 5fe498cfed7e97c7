"""Learning-rate schedules: pure functions from the step to a multiplier of the peak LR.

The trainer sets `lr = peak_lr x multiplier(step)` before every optimizer step, so a checkpoint
needs only the step. Step `s` is 0-based: the first update uses multiplier(0). The variants
(warmup shape, cyclical LR, fine- vs coarse-grained cosine) are those You et al. 2020,
"The Limit of the Batch Size", compare in appendix 6.5.
"""

from __future__ import annotations

import bisect
import math
from functools import partial
from typing import Callable, Sequence

from largebatch.batch import epochs_to_steps
from largebatch.config import ConfigError, ScheduleConfig

Schedule = Callable[[int], float]


def warmup(step: int, warmup_steps: int, start: float = 0.0, shape: str = "linear") -> float:
    """Warmup from `start` toward 1 over `warmup_steps` updates; returns 1 once s >= W.

    Update s < W is t = (s + 1)/W of the way, so with start = 0 the first update already moves
    and update W-1 reaches the peak. linear (Goyal et al. 2017): start + (1 - start) t.
    cosine: start + (1 - start)(1 - cos(pi t))/2, half a cosine wave, flat at both ends.
    """
    if step >= warmup_steps:
        return 1.0
    if shape == "linear":
        return start + (1.0 - start) * (step + 1) / warmup_steps
    if shape == "cosine":
        return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * (step + 1) / warmup_steps))
    raise ValueError(f"unknown warmup shape {shape!r}")


def poly_decay(progress: float, power: float = 2.0, end: float = 0.0) -> float:
    """Polynomial decay (You et al. 2017, LARS): end + (1 - end)(1 - p)^power for p in [0, 1]."""
    return end + (1.0 - end) * (1.0 - min(max(progress, 0.0), 1.0)) ** power


def cosine_decay(progress: float, end: float = 0.0) -> float:
    """Cosine decay (Loshchilov & Hutter 2017): end + (1 - end)(1 + cos(pi p))/2."""
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def step_decay(step: int, milestone_steps: Sequence[int], gamma: float) -> float:
    """gamma ** (number of milestones reached); a milestone at step m applies from update m on."""
    return gamma ** bisect.bisect_right(list(milestone_steps), step)


def cyclic(step: int, cycle_steps: int, low: float = 0.0, decay: float = 1.0) -> float:
    """Triangular cyclical LR (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

    Smith's `triangular` policy half a cycle later, so it starts at the peak a warmup ends on:
    `step` counts updates since the warmup, and each cycle of C updates falls linearly from its
    peak to `low` at update C/2 and rises back to the next peak at update C (the next cycle's
    first). Peak c is low + (1 - low) decay^c; decay = 1 repeats one triangle, 0.5 is Smith's
    `triangular2` (amplitude halved every cycle), and the curve is continuous either way.
    `low` is reached exactly when C is even.
    """
    c, pos = divmod(step, cycle_steps)
    if 2 * pos <= cycle_steps:  # falling half, amplitude of this cycle's peak
        return low + (1.0 - low) * decay ** c * (cycle_steps - 2 * pos) / cycle_steps
    return low + (1.0 - low) * decay ** (c + 1) * (2 * pos - cycle_steps) / cycle_steps


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0,
                  decay: str = "constant", power: float = 2.0, end_factor: float = 0.0,
                  milestone_steps: Sequence[int] = (), gamma: float = 0.1, warmup_shape: str = "linear",
                  epoch_start_steps: Sequence[int] = (), cycle_steps: int = 0, cycle_min: float = 0.0,
                  cycle_decay: float = 1.0) -> float:
    """Warmup for `warmup_steps` updates, then `decay` over the remaining ones.

    Decay progress is p = (s - W) / (T - W), so the last update (s = T - 1) is one step short of
    the end value, as in the LARS and MLPerf reference schedules. With `epoch_start_steps`
    (the first step of every epoch, sorted, from 0) cosine is coarse-grained: update s takes the
    value of the latest epoch start <= s, so the LR changes only where an epoch begins (an epoch
    begun during warmup holds 1 until the next). Poly decay stays fine-grained: the LARS schedule
    it reproduces changes every step. Cyclic restarts its triangles from the end of warmup.
    """
    w = warmup(step, warmup_steps, warmup_start, warmup_shape)
    if step < warmup_steps:
        return w
    span = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    if decay == "constant":
        return 1.0
    if decay == "poly":
        return poly_decay(progress, power, end_factor)
    if decay == "cosine":
        if epoch_start_steps:
            epoch_start = epoch_start_steps[bisect.bisect_right(epoch_start_steps, step) - 1]
            progress = (epoch_start - warmup_steps) / span
        return cosine_decay(progress, end_factor)
    if decay == "step":
        return step_decay(step, milestone_steps, gamma)
    if decay == "cyclic":
        return cyclic(step - warmup_steps, cycle_steps, cycle_min, cycle_decay)
    raise ValueError(f"unknown decay {decay!r}")


def epoch_starts(total_steps: int, dataset_size: int, global_batch: int) -> list[int]:
    """First step of each epoch that starts before `total_steps`: epochs_to_steps(e) for e = 0, 1, ...

    When the batch does not divide the data set a batch straddles the boundary; the epoch starts
    at the step nearest to e x N / B (the one holding most of the new epoch's first examples).
    """
    starts: list[int] = []
    while (s := epochs_to_steps(len(starts), dataset_size, global_batch)) < total_steps:
        starts.append(s)
    return starts


def warmup_steps_of(cfg: ScheduleConfig, dataset_size: int, global_batch: int) -> int:
    """The warmup length in steps: `warmup_steps`, else `warmup_epochs` converted by `batch.epochs_to_steps`."""
    return cfg.warmup_steps or epochs_to_steps(cfg.warmup_epochs, dataset_size, global_batch)


def build_schedule(cfg: ScheduleConfig, total_steps: int, dataset_size: int, global_batch: int) -> Schedule:
    """The schedule of a run; durations in epochs become steps through `batch.epochs_to_steps`."""
    to_steps = partial(epochs_to_steps, dataset_size=dataset_size, global_batch=global_batch)
    warmup_steps = warmup_steps_of(cfg, dataset_size, global_batch)
    milestones = [to_steps(m) for m in cfg.milestones]
    cycle_steps = to_steps(cfg.cycle_epochs)
    if cfg.decay == "cyclic" and cycle_steps < 2:
        raise ConfigError(f"schedule.cycle_epochs = {cfg.cycle_epochs!r} is invalid: it is {cycle_steps} step(s) "
                          f"at batch {global_batch} of {dataset_size} examples; a cycle needs at least 2 steps")
    coarse = epoch_starts(total_steps, dataset_size, global_batch) if cfg.cosine_granularity == "epoch" else []
    return partial(lr_multiplier, total_steps=total_steps, warmup_steps=min(warmup_steps, total_steps),
                   warmup_start=cfg.warmup_start, decay=cfg.decay, power=cfg.power,
                   end_factor=cfg.end_factor, milestone_steps=milestones, gamma=cfg.gamma,
                   warmup_shape=cfg.warmup_shape, epoch_start_steps=coarse, cycle_steps=cycle_steps,
                   cycle_min=cfg.cycle_min, cycle_decay=cfg.cycle_decay)
