"""Checkpoints: atomic writes, the latest one found by name, exact resume.

A checkpoint holds the step, the model and optimizer states, the RNG states and the running
best metric; the LR schedule and the data order are functions of the step, so nothing else is
needed for a resumed run to reproduce an uninterrupted one bit for bit (CPU, fp32).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

NAME = "checkpoint.pt"


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


def load(path: Path, map_location: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
