"""largebatch: large-batch synchronous data-parallel training, and where batch scaling stops paying.

The public API is `__all__` here and in `largebatch.optim` (tests/test_packaging.py checks both lists, that every
name resolves and has a docstring):

    train        largebatch.trainer.train: train a RunConfig, optionally with your own model, data and task
    RunConfig    largebatch.config: the run's typed config tree
    ConfigError  largebatch.config: bad input, with a one-line message that says how to fix it
    RECIPES      largebatch.recipes: the named recipes, name -> function returning a RunConfig
    get_recipe   largebatch.recipes: the RunConfig of a named recipe
    Splits       largebatch.data: your own data (tensors or a torch Dataset per split)
    Task         largebatch.tasks: what a model is trained for (loss and metric)

The names load their modules on first use, so `import largebatch` imports no torch and `from largebatch.optim import
LARS` imports torch and `largebatch.optim` alone (no configs, recipes or CLI parser).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "RECIPES", "RunConfig", "Splits", "Task", "get_recipe", "train"]
__version__ = "0.2.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

_LAZY = {"ConfigError": "largebatch.config", "RunConfig": "largebatch.config", "RECIPES": "largebatch.recipes",
         "get_recipe": "largebatch.recipes", "Splits": "largebatch.data", "Task": "largebatch.tasks",
         "train": "largebatch.trainer"}


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules on first use: the objects themselves, so `largebatch.train`
    is `largebatch.trainer.train` and its signature cannot drift from it."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
