"""Checkpoints: atomic writes, the latest one found by name, exact resume.

A checkpoint holds the step, the model and optimizer states, the RNG states, the running
best metric and the config it was trained under; the LR schedule and the data order are functions
of the step, so nothing else is needed for a resumed run to reproduce an uninterrupted one bit for
bit (CPU, fp32). It holds only tensors and plain Python values, so it is read with
`torch.load(weights_only=True)`: a checkpoint file from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from largebatch.config import ConfigError

NAME = "checkpoint.pt"
REQUIRED = ("step", "model", "optimizer", "rng", "train_state")


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename over `path`.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def save(run_dir: Path, state: dict) -> Path:
    """Atomically write `state` to <run_dir>/checkpoint.pt."""
    path = Path(run_dir) / NAME
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def latest(run_dir: Path) -> Path | None:
    """The run's checkpoint, or None if it has none yet."""
    path = Path(run_dir) / NAME
    return path if path.is_file() else None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of `atomic_write`s that a kill interrupted (.<name>.<random>.tmp).

    Call it only while holding the run directory's lock: a live writer's temporary file looks the same.
    """
    stale = sorted(Path(run_dir).glob(".*.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(path: Path, map_location: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def read(path: Path, map_location: torch.device | str = "cpu") -> dict:
    """The checkpoint at `path`, checked to hold what a resume needs; ConfigError naming the file otherwise."""
    fix = "delete it to restart the run, or restore a copy"
    try:
        state = load(path, map_location)
    except Exception as e:  # noqa: BLE001  a torn or foreign file raises whatever the unpickler or zip reader
        # met (UnpicklingError, RuntimeError, EOFError, OSError, KeyError, IndexError, UnicodeDecodeError,
        # struct.error, AssertionError were seen on truncated and random files): all mean "not a checkpoint"
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{path} is not a readable checkpoint (truncated?): {type(e).__name__}: {reason}; "
                          f"{fix}") from None
    problem = _check(upgrade(state))
    if problem:
        raise ConfigError(f"{path} is not a checkpoint of this trainer: {problem}; {fix}")
    return state


def upgrade(state: Any) -> Any:
    """A checkpoint written before the counters became the `train_state` part (`largebatch.state.TrainState`),
    with its flat keys moved there (in place); others unchanged."""
    if isinstance(state, dict) and "train_state" not in state and "train_seconds" in state:
        state["train_state"] = {"train_seconds": state.pop("train_seconds"),
                                "tta_seconds": state.pop("tta_seconds", 0.0),
                                "best": state.pop("best_test_accuracy", None),
                                "first_train_loss": state.pop("first_train_loss", None)}
    return state


def _check(state: Any) -> str:
    """What is wrong with a loaded checkpoint's structure ('' if nothing)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(state["step"], int) or state["step"] < 0:
        return f"its step is {state['step']!r}"
    if not isinstance(state["model"], dict) or not all(torch.is_tensor(v) for v in state["model"].values()):
        return "its model state is not a dict of tensors"
    if not isinstance(state["optimizer"], dict) or not {"state", "param_groups"} <= state["optimizer"].keys():
        return "its optimizer state lacks state or param_groups"
    if not isinstance(state["rng"], dict) or not torch.is_tensor(state["rng"].get("torch")):
        return "its RNG state is missing"
    if "config" in state and not isinstance(state["config"], dict):
        return "its config is not a mapping"
    return ""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
