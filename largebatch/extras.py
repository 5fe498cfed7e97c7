"""Optional features and the pip extras that install them; a feature whose extra is missing stops with one line.

`pip install largebatch` installs the core (torch, numpy, tqdm, tyro): training any model, data and task (the LeNets,
GPTs, MNIST, CIFAR-10, Shakespeare, your own), `largebatch.optim`, schedules, checkpoints, diagnostics, noise, DDP,
time-to-target, `largebatch probe` and `largebatch plan` (without plots). The rest are extras:

    vision       torchvision: the ResNet and AlexNet built-ins, `torchvision:<model>` names, ImageNet folders
    timm         timm: `timm:<model>` names
    study        optuna, SQLAlchemy, matplotlib: `largebatch study` and `report`, the study's and the plan's plots
    tensorboard  tensorboard: output.tensorboard
    mlperf       mlperf-logging: the MLPerf log of a time-to-target run (skipped without it, see `largebatch.tta`)
                 and the plan's MLPerf ResNet-50 convergence table
    postgres     psycopg 3: `largebatch study --storage postgresql://...` (SQLAlchemy's default PostgreSQL driver)
    docs         mkdocs, mkdocstrings: building the documentation site
    all          every feature extra (not docs)
    dev          all, docs, and what the test suite uses (pytest; packaging and setuptools build the test wheel)

pyproject.toml's `[project.optional-dependencies]` is the source of truth; `EXTRAS` restates it for the messages
and tests/test_packaging.py checks that the two are equal. `require` is the one way a feature asks for its extra:

    optuna = require("study", "optuna", "largebatch study")
    # without it: largebatch: error: largebatch study needs the 'study' extra: pip install 'largebatch[study]'
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from largebatch.config import ConfigError

if TYPE_CHECKING:
    from largebatch.config import RunConfig

EXTRAS: dict[str, tuple[str, ...]] = {
    "vision": ("torchvision",),
    "timm": ("timm",),
    "study": ("optuna>=4", "sqlalchemy", "matplotlib"),
    "tensorboard": ("tensorboard",),
    "mlperf": ("mlperf-logging",),
    "postgres": ("psycopg[binary]>=3.1",),
    "docs": ("mkdocs>=1.6", "mkdocstrings[python]>=1.0"),
    "all": ("largebatch[vision,timm,study,tensorboard,mlperf,postgres]",),
    "dev": ("largebatch[all,docs]", "pytest>=7", "packaging", "setuptools>=61"),
}
"""Each extra's requirements, exactly as pyproject.toml states them (a test keeps the two equal)."""


def require(extra: str, module: str, feature: str) -> ModuleType:
    """Import `module` and return it; if it cannot be imported, a one-line ConfigError saying that `feature` (as the
    user asked for it: a command, a flag, a config field) needs `extra` and the pip command that installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: choose from {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:  # not installed, or installed without its own dependencies: the extra fixes both
        raise ConfigError(f"{feature} needs the {extra!r} extra: pip install 'largebatch[{extra}]'") from e


def check_run(cfg: RunConfig) -> None:
    """Before any work: ConfigError (one line) if `cfg` asks for a feature whose extra is missing and that would
    otherwise fail only once the run is built (TensorBoard, ImageNet folders). Model names are checked by
    `largebatch.models.resolve`, which the trainer calls first; without mlperf-logging a time-to-target run
    goes on without its MLPerf log (`largebatch.tta`)."""
    if cfg.output.tensorboard:
        require("tensorboard", "tensorboard", "output.tensorboard")
    if cfg.data.name == "imagenet":
        require("vision", "torchvision", "data.name = 'imagenet' (image folders)")
