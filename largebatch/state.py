"""What a run carries from step to step, and the one checkpointer that saves and loads it.

`TrainState` holds the run's counters (after torchtitan's `TrainState`). A `Checkpointer` holds one dict of
stateful parts -- the model, the optimizer, the RNG, the counters, the noise-scale EMAs -- each with
`state_dict()` / `load_state_dict()`; it writes `{"step", "config", "world_size", <part>: state, ...}`
atomically to <run_dir>/checkpoint.pt and loads the same keys back, so what is saved and what is restored
cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from largebatch import checkpoint, distributed
from largebatch.config import ConfigError
from largebatch.distributed import Dist


class Diverged(Exception):
    """The loss became NaN or infinite, exploded past eval.divergence_factor, or the give-up rule fired."""


def check_explosion(what: str, loss: float, first: float | None, factor: float, step: int, lr: float) -> None:
    """Diverged when `loss` exceeds `factor` (eval.divergence_factor, 0: off) x the first logged training loss."""
    if factor and first is not None and loss > factor * first:
        raise Diverged(f"{what} {loss:.4g} at step {step} (lr {lr:.4g}) exceeds eval.divergence_factor {factor:g} x "
                       f"the first logged training loss {first:.4g}: the loss exploded")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class TrainState:
    """The run's counters: pure training seconds (evaluation and checkpoints excluded), the time-to-target clock,
    the best value of the task's metric so far (None before the first evaluation) and the first logged training
    loss (the divergence rule's reference)."""

    train_seconds: float = 0.0
    tta_seconds: float = 0.0
    best: float | None = None
    first_train_loss: float | None = None

    def __post_init__(self) -> None:
        self._since: float | None = None  # start of the running stretch of training time (None: paused)

    def state_dict(self) -> dict:
        return {**asdict(self), "train_seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def start_clock(self) -> None:
        """Training time runs from now, if it was paused (after setup, and after each evaluation or checkpoint)."""
        if self._since is None:
            self._since = time.perf_counter()

    def stop_clock(self) -> None:
        """Evaluation and checkpoints are not training time."""
        self.train_seconds = self.seconds()
        self._since = None

    def seconds(self) -> float:
        """Training seconds so far, the running stretch included."""
        return self.train_seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)


class RNGState:
    """The process's torch (and CUDA) generators as a stateful part."""

    def state_dict(self) -> dict:
        return checkpoint.rng_state()

    def load_state_dict(self, state: dict) -> None:
        checkpoint.set_rng_state(state)


class OptimizerState:
    """An optimizer as a stateful part: its full state (gathered from every rank when sharded: a collective) and
    a load that checks the state fits the parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, d: Dist) -> None:
        self.optimizer, self.d = optimizer, d

    def state_dict(self) -> dict:
        return distributed.full_state_dict(self.optimizer, self.d)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)  # group and parameter counts must match
        local = distributed.local_optimizer(self.optimizer)
        for group in local.param_groups:
            for p in group["params"]:
                for key, v in local.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                        raise ValueError(f"optimizer state {key!r} has shape {tuple(v.shape)} for a parameter of "
                                         f"shape {tuple(p.shape)}")


class Checkpointer:
    """Saves and loads one dict of stateful parts (see the module docstring)."""

    def __init__(self, run_dir: Path, parts: dict[str, Stateful], d: Dist, config: dict) -> None:
        self.run_dir, self.parts, self.d, self.config = run_dir, parts, d, config

    def save(self, step: int) -> None:
        """Every rank calls it (gathering a sharded optimizer state is a collective); rank 0 writes."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if self.d.is_main:
            checkpoint.save(self.run_dir, {"step": step, "config": self.config, "world_size": self.d.world_size,
                                           **state})
        distributed.barrier(self.d)

    def load(self, state: dict, path: Path, steps: int) -> int:
        """Load every part from `state` (read from `path` by `checkpoint.read`); return its step. ConfigError when
        the checkpoint is past the run's `steps` or does not fit what was built."""
        fix = "delete it to restart the run, or restore a copy"
        if state["step"] > steps:
            raise ConfigError(f"{path} is at step {state['step']}, past the {steps} steps of this run; {fix}")
        try:
            for name, part in self.parts.items():
                if name in state:  # a part added since the checkpoint was written keeps its fresh state
                    part.load_state_dict(state[name])  # nn.Module: strict, so missing keys and shapes raise
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ConfigError(f"{path} does not fit the model and optimizer this config builds ({detail[:200]}); "
                              f"{fix}") from None
        return state["step"]


def parts_of(model: nn.Module, optimizer: torch.optim.Optimizer, train_state: TrainState, noise_scale: Stateful,
             d: Dist) -> dict[str, Stateful]:
    """The trainer's stateful parts, by checkpoint key. RNG last: loading it is the last thing a resume does."""
    return {"model": model, "optimizer": OptimizerState(optimizer, d), "train_state": train_state,
            "noise_scale": noise_scale, "rng": RNGState()}
