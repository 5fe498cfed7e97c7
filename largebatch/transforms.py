"""Gradient transforms: what happens to the summed gradient between the backward passes and the optimizer step.

After optax's `chain`: each transform is a function `(params, step) -> None` that edits the parameters'
`.grad` in place, and `chain(a, b)` applies a, then b. The trainer builds one chain from the config
(`from_config`: gradient noise, then clipping by the global norm) and `train_step` calls it once per step,
after accumulation and the data-parallel all-reduce, so it sees the gradient of the mean loss over the
global batch, the same on every rank.

Your own transform is any function of that shape, e.g. per-tensor clipping:

    def clip_each(params, step):
        for p in params:
            if p.grad is not None:
                p.grad.clamp_(-1, 1)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from largebatch import noise

GradientTransform = Callable[[Sequence[Tensor], int], None]
"""Edits the `.grad` of `params` in place at optimizer step `step` (0-based)."""


def identity(params: Sequence[Tensor], step: int) -> None:
    """Leaves the gradients as they are."""


def chain(*transforms: GradientTransform) -> GradientTransform:
    """One transform applying `transforms` in order (identity when there are none)."""
    if not transforms:
        return identity
    if len(transforms) == 1:
        return transforms[0]

    def chained(params: Sequence[Tensor], step: int) -> None:
        for t in transforms:
            t(params, step)

    return chained


def add_noise(eta: float, gamma: float, seed: int) -> GradientTransform:
    """g += N(0, eta / (1 + step)^gamma) per element (Neelakantan et al. 2015; `largebatch.noise`), drawn from a
    generator seeded by (seed, step), so every rank and a resumed run add the same noise."""

    def add(params: Sequence[Tensor], step: int) -> None:
        device = params[0].device if params else torch.device("cpu")
        noise.add_gradient_noise_(list(params), noise.gradient_noise_std(step, eta, gamma),
                                  noise.generator(seed, step, "gradient", device))

    return add


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| the norm of all of them together."""

    def clip(params: Sequence[Tensor], step: int) -> None:
        nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    return clip


def from_config(gradient_eta: float, gradient_gamma: float, grad_clip_norm: float, seed: int) -> GradientTransform:
    """The trainer's chain: gradient noise (`noise.gradient_eta` > 0), then clipping (`grad_clip_norm` > 0)."""
    parts = []
    if gradient_eta:
        parts.append(add_noise(gradient_eta, gradient_gamma, seed))
    if grad_clip_norm:
        parts.append(clip_by_global_norm(grad_clip_norm))
    return chain(*parts)
