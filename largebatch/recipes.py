"""Named recipes: functions that return a complete RunConfig.

Each docstring gives the source, the command and the expected result. `largebatch recipes`
lists them; `largebatch show-config --recipe NAME [overrides]` prints one resolved.
"""

from __future__ import annotations

from typing import Callable

from largebatch.config import (BatchConfig, ConfigError, OptimizerConfig, RunConfig, ScheduleConfig)

RECIPES: dict[str, Callable[[], RunConfig]] = {}


def recipe(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    def register(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        RECIPES[name] = fn
        return fn
    return register


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(RECIPES))} (see `largebatch recipes`)")
    return RECIPES[name]()


def describe(name: str) -> str:
    """First line of a recipe's docstring."""
    return (RECIPES[name].__doc__ or "").strip().splitlines()[0]


@recipe("mnist-lenet")
def mnist_lenet() -> RunConfig:
    """MNIST/LeNet-5 baseline: batch 256, momentum SGD, 30 epochs; the seed reports 99.2% test accuracy.

    You et al., "The Limit of the Batch Size": batch 256 reaches 99.2% in 30 epochs. Here: momentum
    0.9, LR 0.05 at batch 256 with cosine decay to 0, weight decay 5e-4 (Caffe's LeNet solver).
        largebatch train --recipe mnist-lenet
    """
    return RunConfig(
        recipe="mnist-lenet",
        epochs=30,
        optimizer=OptimizerConfig(name="sgd", base_lr=0.05, reference_batch=256, scaling="linear",
                                  momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(decay="cosine"),
        batch=BatchConfig(global_batch=256),
    )
