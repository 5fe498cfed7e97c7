"""Optimizers for large-batch training: LARS, LAMB, a layer-wise wrapper for any torch optimizer, and the
parameter-group masks they share.

    from largebatch.optim import build_optimizer, audit
    opt = build_optimizer(model, cfg.optimizer, lr=peak_lr)   # peak_lr: already scaled for the batch
    print(audit(model, opt))                                  # what each tensor gets (decay, trust ratio)

Every optimizer reads `group["lr"]` at each step (the trainer writes peak x schedule multiplier there), never
clips or edits gradients, and exposes its state through the standard `state_dict()`.

This package imports torch and nothing else of largebatch: `cfg` is only type-checked against
`largebatch.config.OptimizerConfig`, whose `OPTIMIZERS` is the one list of names the factory accepts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.layerwise import LayerwiseAdaptive
from largebatch.optim.param_groups import MASKS, audit, param_groups, tensor_kinds

if TYPE_CHECKING:
    from largebatch.config import OptimizerConfig

__all__ = ["LARS", "LAMB", "LayerwiseAdaptive", "MASKS", "param_groups", "tensor_kinds", "audit", "build_optimizer",
           "optimizer_factory"]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer `cfg` names over `model`'s trainable parameters, at peak learning rate `lr`.

    `lr` is the batch-scaled peak LR (`batch.scale_lr`); the trainer overwrites `group["lr"]` every step.
    Groups come from `param_groups(model, cfg.weight_decay, cfg.weight_decay_on, cfg.adapt_on)`, so the
    decay mask and the trust-ratio mask are separate. See `optimizer_factory` for the field mapping.
    """
    make = optimizer_factory(cfg, lr)
    return make(model_param_groups(model, cfg))


def model_param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """`model`'s trainable parameters split by the decay and trust-ratio masks `cfg` asks for (`weights`,
    `matrices` or `all`: `largebatch.optim.param_groups`); a tied tensor (a GPT's embedding and output head)
    is one parameter, in one group."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on, cfg.adapt_on)
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    return groups


def optimizer_factory(cfg: OptimizerConfig, lr: float) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """A function from parameter groups to the optimizer `cfg` names (what ZeroRedundancyOptimizer
    builds on each rank's shard). Mapping of the config fields:

    - sgd: torch SGD(momentum, nesterov, foreach); adam: Adam(betas=(beta1, beta2), eps, L2 decay);
      adamw: AdamW (decoupled decay); adagrad: Adagrad(eps); rmsprop: RMSprop(alpha=beta2, eps, momentum);
    - lars: LARS(momentum, nesterov, trust_coefficient, eps, form=lars_form, min/max_ratio);
    - lamb: LAMB(betas=(beta1, beta2), eps, min/max_ratio) (no trust coefficient: You et al. 2019 use 1);
    - layerwise=True wraps the torch optimizer in LayerwiseAdaptive(layerwise_trust_coefficient,
      min/max_ratio, eps).
    """
    betas = (cfg.beta1, cfg.beta2)
    bounds = dict(min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio)
    torch_optimizers: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
        "sgd": lambda g: torch.optim.SGD(g, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True),
        "adam": lambda g: torch.optim.Adam(g, lr=lr, betas=betas, eps=cfg.eps, foreach=True),
        "adamw": lambda g: torch.optim.AdamW(g, lr=lr, betas=betas, eps=cfg.eps, foreach=True),
        "adagrad": lambda g: torch.optim.Adagrad(g, lr=lr, eps=cfg.eps, foreach=True),
        "rmsprop": lambda g: torch.optim.RMSprop(g, lr=lr, alpha=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum,
                                                 foreach=True),
    }
    if cfg.name not in ("lars", "lamb", *torch_optimizers):
        raise ValueError(f"optimizer name = {cfg.name!r} is invalid: must be one of lars, lamb, "
                         f"{', '.join(torch_optimizers)}")
    if cfg.layerwise and cfg.name in ("lars", "lamb"):
        raise ValueError(f"layerwise = True is invalid with {cfg.name}, which is already layer-wise")

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        if cfg.name == "lars":
            return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, eps=cfg.eps,
                        nesterov=cfg.nesterov, form=cfg.lars_form, **bounds)
        if cfg.name == "lamb":
            return LAMB(groups, lr=lr, betas=betas, eps=cfg.eps, **bounds)
        base = torch_optimizers[cfg.name](groups)
        if cfg.layerwise:
            return LayerwiseAdaptive(base, trust_coefficient=cfg.layerwise_trust_coefficient, eps=cfg.eps, **bounds)
        return base

    return make
