"""The run directory: its name, the config a run was started with, and what a resume may change."""

from __future__ import annotations

import json
import time
from pathlib import Path

from largebatch import distributed
from largebatch.config import ConfigError, RunConfig, from_dict, to_dict
from largebatch.distributed import Dist

# Fields that may change when a run is resumed: they do not alter the trajectory.
RESUMABLE_CHANGES = {"checkpoint.stop_at_step", "checkpoint.every_epochs", "output.progress",
                     "output.tensorboard", "output.log_every", "threads", "eval.batch_size", "eval.every_epochs",
                     "eval.give_up_below", "eval.give_up_after_epochs",
                     "distributed.timeout_s", "distributed.shard_optimizer", "distributed.backend"}


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
    return from_dict(json.loads(path.read_text()))


def check_same_run(run_dir: Path, cfg: RunConfig) -> None:
    """ConfigError unless `cfg` equals the config.json of `run_dir` outside RESUMABLE_CHANGES."""
    old = _flatten(json.loads((run_dir / "config.json").read_text()))
    new = _flatten(json.loads(json.dumps(to_dict(cfg))))
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise ConfigError(f"--resume {run_dir}: {key} is {new.get(key)!r} but the run used {old.get(key)!r}; "
                              f"a resumed run keeps its settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
