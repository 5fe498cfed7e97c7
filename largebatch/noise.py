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
           "ActivationNoise", "PassNoise"]

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


class PassNoise:
    """The noise of a run's forward/backward passes (weights, activations, labels), reseeded at every step.

    `with noise.step(step) as relabel:` perturbs the weights for the enclosed passes (restored afterwards),
    points the activation hooks at this step's generator, and gives `relabel(targets, output)`, which flips
    labels with probability `label_prob` (classes: output.shape[1]). Gradient noise is a gradient transform
    (`largebatch.transforms.add_noise`), applied after the passes.
    """

    def __init__(self, model: nn.Module, seed: int, rank: int, weight_std: float = 0.0, activation_std: float = 0.0,
                 label_prob: float = 0.0) -> None:
        self.seed, self.rank, self.weight_std, self.label_prob = seed, rank, weight_std, label_prob
        self.params = [p for p in model.parameters() if p.requires_grad] if weight_std else []
        self.device = next(model.parameters()).device
        self.activation = ActivationNoise(model, activation_std) if activation_std else None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator:
        if self.activation is not None:
            self.activation.gen = generator(self.seed, step, "activation", self.device, self.rank)
        labels = generator(self.seed, step, "label", self.device, self.rank) if self.label_prob else None
        weights = generator(self.seed, step, "weight", self.device) if self.weight_std else None  # same on all ranks

        def relabel(y: Tensor, output: Tensor) -> Tensor:
            return y if labels is None else flip_labels(y, self.label_prob, output.shape[1], labels)

        with weight_noise(self.params, self.weight_std, weights):
            yield relabel
