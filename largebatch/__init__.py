"""largebatch: large-batch synchronous data-parallel training, and where batch scaling stops paying."""

from largebatch.config import ConfigError, RunConfig
from largebatch.recipes import RECIPES, get_recipe

__all__ = ["ConfigError", "RunConfig", "RECIPES", "get_recipe", "train"]
__version__ = "0.1.0"


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train a config; see largebatch.train.train (imported lazily: torch loads only when used)."""
    from largebatch.train import train as _train

    return _train(cfg, resume)
