"""Learning-rate schedules: pure functions from the step to a multiplier of the peak LR.

The trainer sets `lr = peak_lr x multiplier(step)` before every optimizer step, so a checkpoint
needs only the step. Step `s` is 0-based: the first update uses multiplier(0).
"""

from __future__ import annotations

import bisect
import math
from functools import partial
from typing import Callable, Sequence

from largebatch.batch import epochs_to_steps
from largebatch.config import ScheduleConfig

Schedule = Callable[[int], float]


def warmup(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """Linear warmup (Goyal et al. 2017): from `start` toward 1 over `warmup_steps` updates.

    Update s < W uses start + (1 - start)(s + 1)/W, so with start = 0 the first update already
    moves (LR = peak/W) and update W-1 reaches the peak. Returns 1 once s >= W.
    """
    if step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * (step + 1) / warmup_steps


def poly_decay(progress: float, power: float = 2.0, end: float = 0.0) -> float:
    """Polynomial decay (You et al. 2017, LARS): end + (1 - end)(1 - p)^power for p in [0, 1]."""
    return end + (1.0 - end) * (1.0 - min(max(progress, 0.0), 1.0)) ** power


def cosine_decay(progress: float, end: float = 0.0) -> float:
    """Cosine decay (Loshchilov & Hutter 2017): end + (1 - end)(1 + cos(pi p))/2."""
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def step_decay(step: int, milestone_steps: Sequence[int], gamma: float) -> float:
    """gamma ** (number of milestones reached); a milestone at step m applies from update m on."""
    return gamma ** bisect.bisect_right(list(milestone_steps), step)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0,
                  decay: str = "constant", power: float = 2.0, end_factor: float = 0.0,
                  milestone_steps: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Warmup for `warmup_steps` updates, then `decay` over the remaining ones.

    Decay progress is p = (s - W) / (T - W), so the last update (s = T - 1) is one step short of
    the end value, as in the LARS and MLPerf reference schedules.
    """
    w = warmup(step, warmup_steps, warmup_start)
    if step < warmup_steps:
        return w
    span = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    if decay == "constant":
        return 1.0
    if decay == "poly":
        return poly_decay(progress, power, end_factor)
    if decay == "cosine":
        return cosine_decay(progress, end_factor)
    if decay == "step":
        return step_decay(step, milestone_steps, gamma)
    raise ValueError(f"unknown decay {decay!r}")


def build_schedule(cfg: ScheduleConfig, total_steps: int, dataset_size: int, global_batch: int) -> Schedule:
    """The schedule of a run; durations in epochs become steps through `batch.epochs_to_steps`."""
    warmup_steps = cfg.warmup_steps or epochs_to_steps(cfg.warmup_epochs, dataset_size, global_batch)
    milestones = [epochs_to_steps(m, dataset_size, global_batch) for m in cfg.milestones]
    return partial(lr_multiplier, total_steps=total_steps, warmup_steps=min(warmup_steps, total_steps),
                   warmup_start=cfg.warmup_start, decay=cfg.decay, power=cfg.power,
                   end_factor=cfg.end_factor, milestone_steps=milestones, gamma=cfg.gamma)
