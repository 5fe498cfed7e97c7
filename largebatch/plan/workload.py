"""A `planner.Workload` from a recipe (RunConfig) or a user's model, without loading any data.

The model is built on the meta device (`compute.count_flops`) from its name (`largebatch.models.registry`: built-ins,
`module:function`, timm, torchvision, plug-ins), with the data keywords of the recipe's data set taken from
`DATASETS` (sizes as the data sets' own documentation states them); a user's data set needs --dataset-size and
--input-shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from largebatch.config import ConfigError, RunConfig
from largebatch.plan.compute import count_flops
from largebatch.plan.convergence import Convergence
from largebatch.plan.planner import Workload


@dataclass(frozen=True)
class DataShape:
    """A built-in data set as the plan needs it: training and evaluation examples, input (C, H, W), classes."""

    train: int
    test: int
    channels: int
    size: int
    classes: int


DATASETS: dict[str, DataShape] = {
    "mnist": DataShape(60_000, 10_000, 1, 28, 10),        # LeCun et al. 1998: 60,000 train / 10,000 test
    "cifar10": DataShape(50_000, 10_000, 3, 32, 10),      # Krizhevsky 2009: 50,000 train / 10,000 test
    "imagenet": DataShape(1_281_167, 50_000, 3, 224, 1000),  # ILSVRC-2012: 1,281,167 train / 50,000 val (MLPerf
                                                             # logs train_samples = 1281167, eval_samples = 50000)
}


def data_shape(cfg: RunConfig, dataset_size: int | None = None,
               input_shape: tuple[int, ...] | None = None) -> DataShape:
    """The recipe's data set as a DataShape (image size from data.image_size for imagenet, limits applied), with
    --dataset-size and --input-shape overriding; ConfigError for a data set the plan cannot size."""
    name = cfg.data.name
    base = DATASETS.get(name)
    if base is None and (dataset_size is None or input_shape is None):
        raise ConfigError(f"plan: data set {name!r} has no built-in size: give --dataset-size N and --input-shape "
                          f"C,H,W (built-in: {', '.join(DATASETS)})")
    if base is None:
        base = DataShape(dataset_size, 0, *input_shape[:2], 1000)
    size = cfg.data.image_size if name == "imagenet" else base.size
    train = cfg.data.train_limit or base.train
    train -= cfg.data.val_size
    test = cfg.data.test_limit or base.test
    channels = base.channels
    if input_shape is not None:
        channels, size = input_shape[0], input_shape[-1]
    return DataShape(dataset_size or train, test, channels, size, base.classes)


def model_flops(model_name: str, shape: DataShape) -> tuple[float, int]:
    """(FLOPs of forward + backward per example, parameters) of model `model_name` on `shape`'s inputs."""
    from largebatch.models.registry import build_model, resolve

    factory = resolve(model_name)  # a bad name is a one-line ConfigError

    def build() -> torch.nn.Module:
        return build_model(model_name, num_classes=shape.classes, in_channels=shape.channels, factory=factory,
                           image_size=shape.size)

    return count_flops(build, lambda n: torch.randn(n, shape.channels, shape.size, shape.size))


def workload(cfg: RunConfig, convergence: Convergence, model_name: str | None = None,
             dataset_size: int | None = None, input_shape: tuple[int, ...] | None = None) -> Workload:
    """The Workload of recipe `cfg` (its model unless `model_name`), reaching its target as `convergence` says."""
    if cfg.task not in ("auto", "classification") or cfg.data.name == "shakespeare":
        raise ConfigError(f"plan: only image classification is sized automatically (this recipe's data is "
                          f"{cfg.data.name!r}); plan a language model from Python with planner.Workload")
    shape = data_shape(cfg, dataset_size, input_shape)
    flops, params = model_flops(model_name or cfg.model.name, shape)
    if not flops > 0 or not math.isfinite(flops):
        raise ConfigError(f"plan: no FLOPs counted for model {model_name or cfg.model.name!r} (FlopCounterMode "
                          f"counts matrix products and convolutions); check it takes (N, C, H, W) images")
    return Workload(name=model_name or cfg.model.name, flops_per_example=flops, params=params,
                    dataset_size=shape.train, convergence=convergence, eval_examples=shape.test,
                    eval_every_epochs=cfg.eval.every_epochs)
