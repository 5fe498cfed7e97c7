"""Plain nn.Modules registered by name; they know nothing of distribution or precision.

`MODELS` maps a name to its builder, called as `builder(num_classes=..., in_channels=...)` (and
`zero_init_residual=...` for the names in `RESIDUAL`); `build_model` is the checked way to call it.
`INPUT_SIZE` gives each model's natural (square) input side in pixels -- 28 for the MNIST LeNets, 32 for
the CIFAR ResNets, 224 for the ImageNet models (these also run on smaller inputs: ResNets on any size,
AlexNets down to 63x63). Parameter counts (1000 classes unless said): lenet 431,080 and lenet-bn 432,220
(10 classes); resnet50 and resnet50-v1 25,557,032; resnet50-v2 25,549,352; resnet50-cifar 23,520,842 and
resnet20-cifar 269,722 (10 classes); alexnet 61,100,840; alexnet-bn 61,110,184.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from largebatch.models.alexnet import AlexNetBN, alexnet
from largebatch.models.lenet import LeNet5, LeNet5BN
from largebatch.models.resnet import resnet20_cifar, resnet50, resnet50_cifar, resnet50_v1, resnet50_v2

__all__ = ["INPUT_SIZE", "MODELS", "RESIDUAL", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet5,
    "lenet-bn": LeNet5BN,
    "resnet50": resnet50,
    "resnet50-v1": resnet50_v1,
    "resnet50-v2": resnet50_v2,
    "resnet50-cifar": resnet50_cifar,
    "resnet20-cifar": resnet20_cifar,
    "alexnet": alexnet,
    "alexnet-bn": AlexNetBN,
}

INPUT_SIZE: dict[str, int] = {
    "lenet": 28, "lenet-bn": 28,
    "resnet50": 224, "resnet50-v1": 224, "resnet50-v2": 224,
    "resnet50-cifar": 32, "resnet20-cifar": 32,
    "alexnet": 224, "alexnet-bn": 224,
}
"""Natural input resolution (height = width, pixels) of each model in `MODELS`."""

RESIDUAL: frozenset[str] = frozenset({"resnet50", "resnet50-v1", "resnet50-v2", "resnet50-cifar",
                                      "resnet20-cifar"})
"""Models made of residual blocks: the ones that take `zero_init_residual`."""


def build_model(name: str, num_classes: int = 10, in_channels: int | None = None,
                zero_init_residual: bool = False) -> nn.Module:
    """Instantiate a registered model.

    `in_channels=None` is the model's natural default (1 for the LeNets, 3 for the others).
    `zero_init_residual` starts each residual block as its shortcut (Goyal et al. 2017; see
    `largebatch.models.resnet`); asking it of a model without residual blocks is a ValueError.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    kwargs: dict[str, object] = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    if zero_init_residual:
        if name not in RESIDUAL:
            raise ValueError(f"zero_init_residual needs a model with residual blocks, and {name!r} has none "
                             f"(residual: {', '.join(sorted(RESIDUAL))})")
        kwargs["zero_init_residual"] = True
    return MODELS[name](**kwargs)
