"""Noise injection (You et al. 2020, "The Limit of the Batch Size", section 6.3): can added noise give
a huge batch back the regularisation a small batch's gradient noise provides?

Four places, each off by default (`--noise.*`):

- gradients: N(0, sigma_t^2) added to every gradient after accumulation and the all-reduce, with the
  annealed variance sigma_t^2 = eta / (1 + t)^gamma of Neelakantan et al. 2015 ("Adding gradient noise
  improves learning for very deep networks"; gamma = 0.55);
- weights: the forward and backward of a step run at w + N(0, std^2) and the update is applied to w
  (a perturbed-gradient evaluation, as in weight-noise training; w itself is restored exactly);
- activations: N(0, std^2) added to the output of every hidden conv/linear layer in training mode;
- labels: each training label is replaced, with probability p, by a class drawn uniformly.

Every draw comes from a generator seeded by (seed, step, rank, purpose), so a resumed run draws the
same noise as an uninterrupted one, and the gradient noise is identical on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["generator", "gradient_noise_std", "add_gradient_noise_", "flip_labels", "weight_noise",
           "ActivationNoise"]

PURPOSES = {"gradient": 1, "weight": 2, "activation": 3, "label": 4}


def generator(seed: int, step: int, purpose: str, device: torch.device, rank: int = 0) -> torch.Generator:
    """A generator for one kind of noise at one step (and rank): the same draws wherever it is rebuilt."""
    g = torch.Generator(device=device)
    g.manual_seed((((seed * 1_000_003 + step) * 131 + rank) * 8 + PURPOSES[purpose]) % 2**63)
    return g


def gradient_noise_std(step: int, eta: float, gamma: float = 0.55) -> float:
    """sqrt(eta / (1 + t)^gamma) (Neelakantan et al. 2015, eq. 1), t the 0-based step."""
    return (eta / (1 + step) ** gamma) ** 0.5


@torch.no_grad()
def add_gradient_noise_(params: list[Tensor], std: float, gen: torch.Generator) -> None:
    """p.grad += N(0, std^2) for every parameter with a gradient."""
    for p in params:
        if p.grad is not None:
            p.grad.add_(torch.randn(p.grad.shape, generator=gen, device=p.grad.device, dtype=p.grad.dtype), alpha=std)


def flip_labels(y: Tensor, prob: float, num_classes: int, gen: torch.Generator) -> Tensor:
    """Each label replaced with probability `prob` by a uniformly drawn class (possibly the same one)."""
    if prob <= 0:
        return y
    flip = torch.rand(y.shape, generator=gen, device=y.device) < prob
    random = torch.randint(0, num_classes, y.shape, generator=gen, device=y.device, dtype=y.dtype)
    return torch.where(flip, random, y)


@contextlib.contextmanager
def weight_noise(params: list[Tensor], std: float, gen: torch.Generator) -> Iterator[None]:
    """Run the enclosed forward/backward at w + N(0, std^2); restore w exactly afterwards."""
    if std <= 0:
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype), alpha=std)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


class ActivationNoise:
    """Forward hooks adding N(0, std^2) to the outputs of a model's hidden conv/linear layers (every
    such layer but the last, the classifier) in training mode. `gen` is set by the trainer each step."""

    def __init__(self, model: nn.Module, std: float) -> None:
        self.std = std
        self.gen: torch.Generator | None = None
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
        self.handles = [m.register_forward_hook(self._hook) for m in layers[:-1]] if std > 0 else []

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not module.training or self.gen is None:
            return None
        noise = torch.randn(output.shape, generator=self.gen, device=output.device, dtype=output.dtype)
        return output + self.std * noise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
