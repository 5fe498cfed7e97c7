"""largebatch: large-batch synchronous data-parallel training, and where batch scaling stops paying.

The names below load their modules on first use, so `from largebatch.optim import LARS` imports torch and
`largebatch.optim` alone (no configs, recipes or CLI parser).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "RunConfig", "RECIPES", "Splits", "Task", "get_recipe", "train"]
__version__ = "0.1.0"

_LAZY = {"ConfigError": "largebatch.config", "RunConfig": "largebatch.config", "RECIPES": "largebatch.recipes",
         "get_recipe": "largebatch.recipes", "Splits": "largebatch.data", "Task": "largebatch.tasks"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")


def train(cfg: Any, resume: bool = False, *, model: Any = None, data: Any = None, task: Any = None) -> dict:
    """Train a config, optionally with your own model, data and task; see `largebatch.trainer.train` (imported
    lazily: torch loads only when used)."""
    from largebatch.trainer import train as _train

    return _train(cfg, resume, model=model, data=data, task=task)
