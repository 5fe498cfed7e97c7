"""The run directory: its name, the config a run was started with, what a resume may change, its lock.

A run directory is self-contained and movable: nothing in it records where it lives, so a run can be
resumed by a relative or absolute path, or after the directory was copied or renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

from largebatch import distributed
from largebatch.config import ConfigError, RunConfig, from_dict, read_json_object, to_dict
from largebatch.distributed import Dist

# Fields that may change when a run is resumed: they do not alter the trajectory.
RESUMABLE_CHANGES = {"checkpoint.stop_at_step", "checkpoint.every_epochs", "output.progress",
                     "output.tensorboard", "output.log_every", "threads", "eval.batch_size", "eval.every_epochs",
                     "eval.give_up_worse_than", "eval.give_up_after_epochs", "eval.divergence_factor",
                     "distributed.timeout_s", "distributed.shard_optimizer", "distributed.backend"}
# Where the run lives, not what it is: a resume names the directory, wherever it is now.
LOCATION = {"output.dir", "output.name"}
LOCK = ".lock"


def run_dir_of(cfg: RunConfig, d: Dist = Dist()) -> Path:
    """<output.dir>/<output.name>; without a name, <recipe>-<date>-<time> chosen by rank 0.

    A job that torchrun may restart needs a name that survives the restart: --output.name, or
    torchrun's --rdzv-id.
    """
    name = cfg.output.name or (distributed.elastic_run_id() and f"{cfg.recipe}-{distributed.elastic_run_id()}")
    if not name:
        if distributed.elastic_max_restarts() > 0:
            raise ConfigError("torchrun --max-restarts needs a run name that survives a restart: pass "
                              "--output.name NAME (or torchrun --rdzv-id ID)")
        name = distributed.broadcast(f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}", d)
    return Path(cfg.output.dir) / name


def resume_config(run_dir: Path) -> RunConfig:
    """The config a run was started with, read from its config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there; pass the directory of an earlier run")
    return from_dict(_read_json(path))


def check_same_run(run_dir: Path, cfg: RunConfig, trained: dict | None = None) -> None:
    """ConfigError unless `cfg` equals the run's config outside RESUMABLE_CHANGES and LOCATION.

    `trained` is the config the checkpoint carries, what its weights were trained under, so a hand-edited
    config.json is caught. Checkpoints written before they carried it fall back to config.json.
    Both sides go through `from_dict`, so keys added (defaults) or renamed since the run started compare.
    """
    source = "checkpoint.pt" if trained is not None else "config.json"
    try:
        old = _flatten(_plain(to_dict(from_dict(trained if trained is not None else _read_json(run_dir / source)))))
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: the config in its {source} is invalid ({e})") from None
    new = _flatten(_plain(to_dict(cfg)))
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES | LOCATION and old.get(key) != new.get(key):
            raise ConfigError(f"--resume {run_dir}: {key} is {new.get(key)!r} but the run used {old.get(key)!r} "
                              f"(its {source}); a resumed run keeps its settings (only "
                              f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)")


def check_output_path(run_dir: Path) -> None:
    """ConfigError unless `run_dir` is, or can be made as, a writable directory (checked before any work)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the run directory {run_dir} is a file, not a directory: remove it or choose another "
                          f"--output.name")
    at = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path.cwd())  # the nearest that exists
    if not at.is_dir():
        raise ConfigError(f"--output-dir {run_dir.parent} cannot hold run directories: {at} is a file, not a "
                          f"directory; choose another --output-dir")
    if not os.access(at, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {run_dir.parent}: {at} is not writable by this user; choose another "
                          f"--output-dir or fix its permissions")


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (a POSIX record lock, `lockf`, on <run_dir>/.lock) until the block ends.

    A second process training the same directory fails at once with ConfigError. The OS releases the
    lock when the holder exits or dies, so a killed run leaves nothing to clean up. Not `flock`: forked
    children share an flock, so DataLoader workers of a SIGKILLed trainer, which live on until they notice,
    kept its run locked for seconds; record locks belong to the process alone.
    """
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{run_dir} is being trained by another process (pid {pid}); wait for it or "
                              f"stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_json(path: Path) -> dict:
    return read_json_object(path, str(path), "restore it from a copy")


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples become lists, as in config.json


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
