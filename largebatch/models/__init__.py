"""Plain nn.Modules, and the open registry that turns a `model.name` into one; they know nothing of distribution
or precision.

A model name is a built-in (`BUILTIN`), `module.path:callable`, `timm:<model>`, `torchvision:<model>` or an
installed plug-in's name (entry-point group `largebatch.models`); `resolve(name)` imports its factory and
`build_model(name, num_classes=..., in_channels=..., **data_kw)` calls it with the keywords describing the data
that it accepts (the protocol is in `largebatch.models.registry`). `MODELS` maps each built-in name to its
builder: the image classifiers are called as `builder(num_classes=..., in_channels=...)` (and
`zero_init_residual=...` for the names in `RESIDUAL`), the language models `gpt-*` as
`builder(vocab_size=..., block_size=...)` (`largebatch.models.gpt`).

`INPUT_SIZE` gives each built-in image model's natural (square) input side in pixels -- 28 for the MNIST LeNets, 32
for the CIFAR ResNets, 224 for the ImageNet models (these also run on smaller inputs: ResNets on any size, AlexNets
down to 63x63); the language models take token sequences and have none. Parameter counts (1000 classes unless
said): lenet 431,080 and lenet-bn 432,220 (10 classes); resnet50 and resnet50-v1 25,557,032; resnet50-v2
25,549,352; resnet50-cifar 23,520,842 and resnet20-cifar 269,722 (10 classes); alexnet 61,100,840; alexnet-bn
61,110,184. The GPTs at a 65-character vocabulary and their own block size: gpt-tiny 208,320; gpt-mini 804,096;
gpt-char 10,745,088; gpt2-small 124,439,808 at GPT-2's 50,257 tokens (the table in `largebatch.models.gpt`).

Importing this package imports no torch (config validation uses `check_name` and `RESIDUAL`); `MODELS`,
`resolve` and `build_model` import the model modules when used.
"""

from __future__ import annotations

from typing import Any

from largebatch.models.registry import (BUILTIN, DATA_KEYWORDS, GROUP, RESIDUAL, build_model, check_name,
                                        resolve)

__all__ = ["BUILTIN", "DATA_KEYWORDS", "GROUP", "INPUT_SIZE", "MODELS", "RESIDUAL", "build_model", "check_name",
           "resolve"]

INPUT_SIZE: dict[str, int] = {
    "lenet": 28, "lenet-bn": 28,
    "resnet50": 224, "resnet50-v1": 224, "resnet50-v2": 224,
    "resnet50-cifar": 32, "resnet20-cifar": 32,
    "alexnet": 224, "alexnet-bn": 224,
}
"""Natural input resolution (height = width, pixels) of each built-in image model (not the language models)."""


def __getattr__(name: str) -> Any:
    if name == "MODELS":  # the built-in builders, imported on first use (they import torch)
        models = {n: resolve(n) for n in BUILTIN}
        globals()["MODELS"] = models
        return models
    raise AttributeError(f"module 'largebatch.models' has no attribute {name!r}")
