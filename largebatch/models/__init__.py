"""Plain nn.Modules registered by name; they know nothing of distribution or precision."""

from __future__ import annotations

from typing import Callable

from torch import nn

from largebatch.models.lenet import LeNet5, LeNet5BN

MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet5, "lenet-bn": LeNet5BN}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a registered model."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)
