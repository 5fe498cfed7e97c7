"""Batch-size sweeps with tuning: one Optuna study per (rung, batch) in RDB storage, one run per seed.

Each study holds the **untuned** trial (the recipe's base LR scaled linearly to B, Goyal et al. 2017,
with the recipe's warmup: the baseline tuning must beat) and `trials` **tuned** trials: an LR
multiplier on that scaled LR and a warmup length, from a grid (log-spaced LR multipliers x evenly
spaced warmups, in `grid_order`: coverage first, so a small budget brackets the scaled LR on both sides)
or a seeded TPE; Shallue et al. 2019 found grid search as good as an auto-tuner. A trial trains every
seed and maximises the mean final accuracy (validation accuracy when the data has a validation split,
else test); diverged or failed runs score 0. The trial's user
attribute "records" holds one **trial record** (see `largebatch.study`) per seed.

    spec = StudySpec(recipe="mnist-lenet", batch_sizes=(256, 4096), rungs=("sgd", "lars"), epochs=30,
                     trials=8, seeds=3, target_accuracy=0.99)
    records = run_study(spec, "sqlite:///runs/study.db", "lenet", workers=2)

**Resuming.** The storage (SQLite or any SQLAlchemy URL, so several machines can share a study) is
the state: run_study counts finished (COMPLETE/PRUNED) trials and runs only missing ones. Trials beat
a heartbeat every HEARTBEAT_S s; a killed process's RUNNING trial goes stale after GRACE_S, is marked
FAIL and re-queued with its parameters (Optuna's RetryHeartbeatStaleTrialCallback), and run_study
polls until it is done. A stop request (SIGINT/SIGTERM) re-queues the trial and raises `Stopped`. Run
directories are output_dir/name/rung/b{B}/t{trial}-s{seed}, a re-queued trial keeping its first
number: a finished summary.json there is reused, a checkpoint is resumed.

**More seeds.** Raising `seeds` on a finished study runs only the missing seeds: a *top-up* trial
(user attributes top_up_of, seeds, run_number) repeats a finished trial's point for the seeds it
lacks, best trials first, writing t{trial}-s{seed} beside the first seeds; records aggregate per
point, so top-ups count as more seeds of that point, not as new trials.

**Importing.** `import_records` rebuilds a study's trials from the records of a report's trials.csv
(a database lost or left on another machine): the study then continues, with finished points, their
seeds and their run-directory numbers as they were.

**Races.** Processes claim trials by counting; when two claim the last slot, or the same grid point,
the later trial is failed as surplus before training and the process claims the next free point.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
import torch
from optuna.trial import TrialState

from largebatch import checkpoint
from largebatch.batch import scale_lr
from largebatch.config import OPTIMIZERS, ConfigError, RunConfig, ScheduleConfig, _require, from_dict, to_dict
from largebatch.metrics import read_metrics
from largebatch.recipes import get_recipe
from largebatch.rundir import check_same_run
from largebatch.trainer import train

HEARTBEAT_S = 60  # seconds between a running trial's heartbeats
GRACE_S = 180  # a RUNNING trial without a heartbeat for this long belongs to a killed process
POLL_S = 30  # wait between checks while other processes hold the study's last trials
LARS_RECIPE = "mnist-lenet-lars-8k"  # the optimizer and decay of the `lars` rung on a non-LARS recipe
_CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class Stopped(Exception):
    """A stop request ended a training run; its trial is re-queued and resumes on the next run_study."""


class _Surplus(Exception):
    """Another process claimed this trial's slot first."""


@dataclass
class StudySpec:
    """What to sweep: a recipe over batch sizes and rungs, with a tuning budget per (rung, batch)."""

    recipe: str
    """Recipe name (`largebatch recipes`); its base LR at its reference batch is the untuned point."""
    batch_sizes: tuple[int, ...]
    """Global batch sizes B."""
    rungs: tuple[str, ...] = ("sgd",)
    """Rung names from RUNGS: optimizers (sgd, lars, lamb, adam, adamw, adagrad, rmsprop)."""
    epochs: float = 30.0
    """Training budget of every run, in epochs; the recipe's schedule (warmup, milestones) is stretched to it."""
    trials: int = 8
    """Tuned trials per (rung, batch), beyond the untuned one."""
    seeds: int = 1
    """Seeds (0 .. seeds-1) per trial; the objective is the mean accuracy over them."""
    sampler: str = "grid"
    """`grid`: lr_points x warmup_points in `grid_order`; `tpe`: seeded TPESampler."""
    lr_range: tuple[float, float] = (1 / 8, 8.0)
    """LR multipliers on the linearly scaled base LR (log scale)."""
    warmup_range: tuple[float, float] = (0.0, 1 / 6)
    """Warmup length as a fraction of `epochs` ((0, 1/6): 0-5 epochs of a 30-epoch budget)."""
    lr_points: int = 7
    """LR grid points, log-spaced over lr_range (7 over (1/8, 8): powers of 2)."""
    warmup_points: int = 3
    """Warmup grid points, evenly spaced over warmup_range."""
    target_accuracy: float | None = None
    """Accuracy whose first crossing gives a record's steps_to_target (None: not measured)."""
    output_dir: str = "runs"
    """Run directories go under output_dir/<study name>/<rung>/b<B>/t<trial>-s<seed>."""
    extra: dict[str, Any] = field(default_factory=dict)
    """RunConfig overrides for every run, by field path: {"data.train_limit": 1024, "threads": 1}."""
    seed: int = 0
    """Seed of TPE's draws (the grid order is fixed)."""

    def __post_init__(self) -> None:
        self.batch_sizes, self.rungs = tuple(self.batch_sizes), tuple(self.rungs)
        self.lr_range, self.warmup_range = tuple(self.lr_range), tuple(self.warmup_range)
        for r in self.rungs:
            _require(r in RUNGS, "rung", r, f"choose from {', '.join(RUNGS)}")
        _require(bool(self.batch_sizes) and min(self.batch_sizes) >= 1, "batch_sizes", self.batch_sizes,
                 "give one or more batch sizes >= 1")
        _require(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        _require(self.trials >= 0, "trials", self.trials, "must be >= 0")
        _require(self.seeds >= 1, "seeds", self.seeds, "must be >= 1")
        _require(self.sampler in ("grid", "tpe"), "sampler", self.sampler, "must be grid or tpe")
        _require(0 < self.lr_range[0] <= self.lr_range[1], "lr_range", self.lr_range, "need 0 < low <= high")
        _require(0 <= self.warmup_range[0] <= self.warmup_range[1] <= 1, "warmup_range", self.warmup_range,
                 "need 0 <= low <= high <= 1 (fractions of epochs)")
        _require(min(self.lr_points, self.warmup_points) >= 1, "lr_points, warmup_points",
                 (self.lr_points, self.warmup_points), "must be >= 1")
        grid = len(lr_grid(self)) * len(warmup_grid(self))
        _require(self.sampler != "grid" or self.trials <= grid, "trials", self.trials,
                 f"exceeds the grid of {grid} points: lower trials, add lr_points/warmup_points, or use sampler tpe")
        _set_paths(to_dict(RunConfig()), self.extra)  # unknown field paths fail here, before any run


# ---------------------------------------------------------------------------------------------
# rungs and run configs


def _optimizer_rung(name: str) -> Callable[[RunConfig], RunConfig]:
    def apply(cfg: RunConfig) -> RunConfig:
        if name == "lars" and cfg.optimizer.name != "lars":  # LARS's LR, trust coefficient and poly decay
            lars = get_recipe(LARS_RECIPE)
            s = cfg.schedule
            schedule = replace(lars.schedule, warmup_epochs=s.warmup_epochs, warmup_steps=s.warmup_steps,
                               warmup_start=s.warmup_start, warmup_shape=s.warmup_shape)
            return replace(cfg, optimizer=lars.optimizer, schedule=schedule)
        return replace(cfg, optimizer=replace(cfg.optimizer, name=name))
    return apply


# The recipe ladder of You et al. 2020 (Fig. 1): momentum SGD with linear LR scaling, cosine decay,
# gradient clipping and ghost BN (statistics over the recipe's reference batch; a no-op for a model
# without BN), then + warmup, + LR/warmup tuning, + label smoothing, + LARS. The first two rungs are
# untuned by definition; the clipping bound only cuts the first large-gradient steps (LeNet starts near 25).
LADDER_CLIP = 5.0
LADDER_LABEL_SMOOTHING = 0.1


def _ladder_base(cfg: RunConfig) -> RunConfig:
    return replace(cfg, grad_clip_norm=cfg.grad_clip_norm or LADDER_CLIP,
                   optimizer=replace(cfg.optimizer, name="sgd", layerwise=False),
                   schedule=replace(cfg.schedule, warmup_epochs=0.0, warmup_steps=0, decay="cosine", milestones=()),
                   model=replace(cfg.model, ghost_batch=cfg.model.ghost_batch or cfg.optimizer.reference_batch))


def _ladder_warmup(cfg: RunConfig) -> RunConfig:
    base = _ladder_base(cfg)
    return replace(base, schedule=replace(base.schedule, warmup_epochs=cfg.schedule.warmup_epochs,
                                          warmup_steps=cfg.schedule.warmup_steps))


def _ladder_smoothing(cfg: RunConfig) -> RunConfig:
    return replace(_ladder_warmup(cfg), label_smoothing=LADDER_LABEL_SMOOTHING)


RUNGS: dict[str, Callable[[RunConfig], RunConfig]] = {
    **{name: _optimizer_rung(name) for name in OPTIMIZERS},
    "ladder-sgd": _ladder_base,
    "+warmup": _ladder_warmup,
    "+tuning": _ladder_warmup,
    "+label_smoothing": _ladder_smoothing,
    "+lars": lambda cfg: _optimizer_rung("lars")(_ladder_smoothing(cfg)),
}
"""Rung name -> function from the recipe's config to the rung's: the optimizers, and the ladder."""

UNTUNED_RUNGS = ("ladder-sgd", "+warmup")  # ladder rungs before "+tuning" run only the scaled base LR


def trials_of(spec: "StudySpec", rung: str) -> int:
    """Tuned trials a (rung, batch) study runs."""
    return 0 if rung in UNTUNED_RUNGS else spec.trials


def rung_config(base_cfg: RunConfig, rung: str, batch: int) -> RunConfig:
    """`base_cfg` changed by `rung` (see RUNGS) at global batch `batch`; raises ConfigError if invalid."""
    if rung not in RUNGS:
        raise ConfigError(f"rung {rung!r} is unknown: choose from {', '.join(RUNGS)}")
    cfg = RUNGS[rung](base_cfg)
    return replace(cfg, batch=replace(cfg.batch, global_batch=batch))


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """`cfg` with values set by field path ("data.train_limit"); the result is validated."""
    return from_dict(_set_paths(to_dict(cfg), overrides))


def _set_paths(d: dict, overrides: dict[str, Any]) -> dict:
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override {path!r} names no config field (see `largebatch show-config`)")
        node[leaf] = value
    return d


def stretch_schedule(s: ScheduleConfig, factor: float) -> ScheduleConfig:
    """The schedule's epoch lengths scaled by `factor` (the recipe's schedule at another budget)."""
    return replace(s, warmup_epochs=s.warmup_epochs * factor, milestones=tuple(m * factor for m in s.milestones),
                   cycle_epochs=s.cycle_epochs * factor)


def cell_config(spec: StudySpec, rung: str, batch: int) -> RunConfig:
    """The untuned config of one (rung, batch): recipe -> rung -> budget, linear LR scaling -> extra overrides."""
    cfg = rung_config(get_recipe(spec.recipe), rung, batch)
    cfg = replace(cfg, epochs=spec.epochs, schedule=stretch_schedule(cfg.schedule, spec.epochs / cfg.epochs),
                  optimizer=replace(cfg.optimizer, scaling="linear"))
    return apply_overrides(cfg, spec.extra)


def run_config(cell: RunConfig, lr_multiplier: float, warmup_epochs: float | None, seed: int,
               run_dir: Path) -> RunConfig:
    """One run of a trial: the cell's base LR x `lr_multiplier`, `warmup_epochs` (None: the cell's)."""
    schedule = cell.schedule if warmup_epochs is None else replace(cell.schedule, warmup_epochs=warmup_epochs,
                                                                   warmup_steps=0)
    return replace(cell, seed=seed, schedule=schedule,
                   optimizer=replace(cell.optimizer, base_lr=cell.optimizer.base_lr * lr_multiplier),
                   output=replace(cell.output, dir=str(run_dir.parent), name=run_dir.name, progress=False))


def _spaced(lo: float, hi: float, n: int, log: bool) -> list[float]:
    """n points from lo to hi (endpoints exact), evenly or log-spaced, 6 significant digits, no repeats."""
    at = (lambda t: lo * (hi / lo) ** t) if log else (lambda t: lo + (hi - lo) * t)
    return sorted({lo, hi, *(float(f"{at(i / (n - 1)):.6g}") for i in range(1, n - 1))}) if n > 1 else [lo]


def lr_grid(spec: StudySpec) -> list[float]:
    """`lr_points` LR multipliers log-spaced over lr_range."""
    return _spaced(*spec.lr_range, spec.lr_points, log=True)


def warmup_bounds(spec: StudySpec) -> tuple[float, float]:
    """warmup_range in epochs (6 significant digits)."""
    lo, hi = (float(f"{f * spec.epochs:.6g}") for f in spec.warmup_range)
    return lo, hi


def warmup_grid(spec: StudySpec) -> list[float]:
    """`warmup_points` warmup lengths in epochs, evenly spaced over warmup_bounds."""
    return _spaced(*warmup_bounds(spec), spec.warmup_points, log=False)


def grid_order(spec: StudySpec, warmup_epochs: float, downward: bool = False) -> list[dict[str, float]]:
    """The tuned grid points in the order trials take them, coverage first.

    Round r pairs every LR multiplier with the r-th warmup nearest to `warmup_epochs` (the cell's untuned
    warmup), so the first round is an LR sweep at the recipe's warmup and later rounds tune warmup.
    Within a round the multipliers go outward from the scaled LR, lower first (1/2, 2, 1/4, 4, ...), and
    1 itself comes last (the untuned trial ran it): two trials bracket the scaled LR from both sides,
    where a random order may spend them both on one side. `downward` (the scaled LR itself diverged)
    tries every multiplier below 1 first, nearest first, then the rest.
    """
    lrs = sorted(lr_grid(spec), key=lambda m: (downward and m >= 1.0, m == 1.0, round(abs(math.log(m)), 9), m))
    warmups = sorted(warmup_grid(spec), key=lambda w: (round(abs(w - warmup_epochs), 9), w))
    return [{"lr_multiplier": m, "warmup_epochs": w} for w in warmups for m in lrs]


def _point(trial: optuna.trial.FrozenTrial) -> tuple[float, float] | None:
    """A tuned trial's grid point: its parameters, or the fixed ones of an enqueued (WAITING) trial."""
    p = trial.params or trial.system_attrs.get("fixed_params") or {}
    return (p["lr_multiplier"], p["warmup_epochs"]) if "lr_multiplier" in p else None


def _same(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                                                   for x, y in zip(a, b))


def next_grid_point(spec: StudySpec, warmup_epochs: float,
                    trials: list[optuna.trial.FrozenTrial]) -> dict[str, float] | None:
    """The first point of grid_order that no claimed tuned trial holds (None: the grid is used up); the
    order goes downward once the untuned trial, or a top-up of its seeds, has finished with score 0
    (every seed of that trial diverged or failed)."""
    taken = [_point(t) for t in trials if t.state in _CLAIMED and t.user_attrs.get("tuned", True)]
    downward = any(t.state == TrialState.COMPLETE and not t.user_attrs.get("tuned", True) and t.value == 0
                   for t in trials)
    for p in grid_order(spec, warmup_epochs, downward):
        if not any(_same((p["lr_multiplier"], p["warmup_epochs"]), q) for q in taken):
            return p
    return None


# ---------------------------------------------------------------------------------------------
# one trial: every seed, one record each


def _run(cfg: RunConfig) -> dict:
    """Train `cfg`, reusing a finished summary.json in its directory or resuming its checkpoint."""
    run_dir = Path(cfg.output.dir) / cfg.output.name
    path = run_dir / "summary.json"
    if path.is_file():
        check_same_run(run_dir, cfg)  # a directory left by another study (storage deleted) is not reused
        summary = json.loads(path.read_text())
        if summary["status"] in ("completed", "diverged"):
            return summary
    return train(cfg, resume=checkpoint.latest(run_dir) is not None)


def steps_to_target(run_dir: Path, target: float) -> int | None:
    """First evaluated step whose validation accuracy (test accuracy without a validation split) >= target."""
    for r in read_metrics(run_dir):
        acc = r.get("val_accuracy", r.get("test_accuracy"))
        if isinstance(acc, (int, float)) and acc >= target:
            return r["step"]
    return None


def retarget(record: dict, target: float) -> dict:
    """`record` measured against another target accuracy, from its run's metrics.jsonl; a completed run
    whose directory is not on this machine keeps its own target and steps."""
    run_dir = Path(record.get("run_dir") or "")
    if record["status"] != "completed":
        return {**record, "target_accuracy": target, "steps_to_target": None}
    if not (run_dir / "metrics.jsonl").is_file():
        return record
    return {**record, "target_accuracy": target, "steps_to_target": steps_to_target(run_dir, target)}


def run_record(spec: StudySpec, name: str, rung: str, batch: int, trial: int, seed: int, tuned: bool,
               lr_multiplier: float, warmup_epochs: float | None) -> dict:
    """Run (or reuse) one training run and return its trial record; exceptions become status "failed"."""
    run_dir = Path(spec.output_dir) / name / rung / f"b{batch}" / f"t{trial}-s{seed}"
    cfg, summary, message, t0 = None, {}, "", time.perf_counter()
    try:
        cfg = run_config(cell_config(spec, rung, batch), lr_multiplier, warmup_epochs, seed, run_dir)
        summary = _run(cfg)
        status, message = summary["status"], summary.get("message", "")
    except Exception as e:  # an invalid combination or a crash is a result of this point, not of the study
        status, message = "failed", f"{type(e).__name__}: {e}"
    completed = status == "completed"
    metrics = read_metrics(run_dir) if run_dir.is_dir() else []
    losses = [r["train_loss"] for r in metrics if "train_loss" in r]
    opt = cfg.optimizer if cfg is not None else None
    return {
        "study": name, "rung": rung, "batch_size": batch, "seed": seed, "tuned": tuned,
        "base_lr": opt.base_lr if opt else None, "reference_batch": opt.reference_batch if opt else None,
        "peak_lr": summary.get("peak_lr") or (scale_lr(opt.base_lr, batch, opt.reference_batch, opt.scaling)
                                              if opt else None),
        "warmup_epochs": cfg.schedule.warmup_epochs if cfg else warmup_epochs, "epochs": spec.epochs,
        "status": status,
        **{k: _finite(summary.get(k)) if completed else None
           for k in ("test_accuracy", "val_accuracy", "val_loss", "test_loss")},
        "train_loss": _finite(losses[-1]) if losses else None,
        "steps": summary.get("steps", 0),
        "steps_to_target": (steps_to_target(run_dir, spec.target_accuracy)
                            if completed and spec.target_accuracy is not None else None),
        "target_accuracy": spec.target_accuracy,
        "wall_seconds": summary.get("wall_seconds", time.perf_counter() - t0),
        "run_dir": str(run_dir),
        "trial": trial, "lr_multiplier": lr_multiplier, "message": message,
    }


def _finite(x: Any) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def score(record: dict) -> float:
    """Objective contribution of a record: final val (else test) accuracy; 0 unless completed."""
    if record["status"] != "completed":
        return 0.0
    acc = record["val_accuracy"] if record["val_accuracy"] is not None else record["test_accuracy"]
    return acc or 0.0


def _claimed(trials: list[optuna.trial.FrozenTrial], tuned: bool, before: int | None = None) -> int:
    """Claimed trials (not top-ups) of one kind, optionally only those numbered below `before`."""
    return sum(1 for t in trials if t.state in _CLAIMED and t.user_attrs.get("tuned", True) == tuned
               and _base(t) is None and (before is None or t.number < before))


def _base(t: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial whose seeds top-up trial `t` adds to (None: `t` is not a top-up)."""
    return t.user_attrs.get("top_up_of")


def _run_number(t: optuna.trial.FrozenTrial) -> int:
    """The trial number in a trial's run directories (t{number}-s{seed}): a re-queued trial keeps the first
    one's, a top-up its base trial's."""
    return t.user_attrs.get("run_number", t.system_attrs.get("failed_trial", t.number))


def next_top_up(spec: StudySpec, trials: list[optuna.trial.FrozenTrial]
                ) -> tuple[optuna.trial.FrozenTrial, list[int]] | None:
    """The finished trial, best first, lacking some of seeds 0 .. spec.seeds-1 (counting the seeds of its
    records and of its claimed top-ups), and the seeds it lacks; None when every finished trial has all."""
    held: dict[int, set[int]] = defaultdict(set)
    for t in trials:
        if _base(t) is None and t.state in _DONE:
            held[t.number] |= {r["seed"] for r in t.user_attrs.get("records", [])}
        elif _base(t) is not None and t.state in _CLAIMED:
            held[_base(t)] |= set(t.user_attrs["seeds"])
    bases = sorted((t for t in trials if _base(t) is None and t.state in _DONE),
                   key=lambda t: (-(t.value or 0.0), t.number))
    for t in bases:
        missing = [s for s in range(spec.seeds) if s not in held[t.number]]
        if missing:
            return t, missing
    return None


def _objective(spec: StudySpec, name: str, rung: str, batch: int, current: dict) -> Callable:
    def objective(trial: optuna.Trial) -> float:
        current["number"] = trial.number
        trials = trial.study.get_trials(deepcopy=False)
        tuned = trial.user_attrs.get("tuned", True)
        me = next(t for t in trials if t.number == trial.number)
        if _base(me) is not None:
            return _top_up_objective(spec, name, rung, batch, trial, me, trials)
        if _claimed(trials, tuned, before=trial.number) >= (trials_of(spec, rung) if tuned else 1):
            raise _Surplus(f"trial {trial.number}: another process claimed the last slot")
        number = _run_number(me)  # a re-queued trial keeps its run dirs
        lr_mult, warmup = 1.0, None
        if tuned:
            lr_mult = trial.suggest_float("lr_multiplier", *spec.lr_range, log=True)
            warmup = trial.suggest_float("warmup_epochs", *warmup_bounds(spec))
            # after suggesting (the point is in storage): a lower trial of another process drew it too
            if spec.sampler == "grid" and any(
                    _same((lr_mult, warmup), _point(t)) for t in trial.study.get_trials(deepcopy=False)
                    if t.number < trial.number and t.state in _CLAIMED and t.user_attrs.get("tuned", True)
                    and _base(t) is None):
                raise _Surplus(f"trial {trial.number}: another process claimed grid point {(lr_mult, warmup)}")
        trial.set_user_attr("tuned", tuned)
        return _run_seeds(trial, spec, name, rung, batch, number, range(spec.seeds), tuned, lr_mult, warmup)
    return objective


def _top_up_objective(spec: StudySpec, name: str, rung: str, batch: int, trial: optuna.Trial,
                      me: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> float:
    """More seeds at a finished trial's point (its fixed parameters), in its run-directory numbering."""
    seeds = me.user_attrs["seeds"]
    if any(t.number < me.number and t.state in _CLAIMED and _base(t) == _base(me)
           and set(t.user_attrs["seeds"]) & set(seeds) for t in trials):
        raise _Surplus(f"trial {me.number}: another process claimed seeds {seeds} of trial {_base(me)}")
    p = me.system_attrs.get("fixed_params") or {}
    return _run_seeds(trial, spec, name, rung, batch, _run_number(me), seeds, me.user_attrs["tuned"],
                      p.get("lr_multiplier", 1.0), p.get("warmup_epochs"))


def _run_seeds(trial: optuna.Trial, spec: StudySpec, name: str, rung: str, batch: int, run_number: int,
               seeds: Iterable[int], tuned: bool, lr_mult: float, warmup: float | None) -> float:
    """One record per seed into the trial's "records" user attribute; the mean score is the trial's value."""
    records = []
    for seed in seeds:
        record = run_record(spec, name, rung, batch, run_number, seed, tuned, lr_mult, warmup)
        if record["status"] == "stopped":
            raise Stopped(f"{record['run_dir']}: {record['message']}")
        records.append(record)
        trial.set_user_attr("records", records)
    return sum(score(r) for r in records) / len(records)


# ---------------------------------------------------------------------------------------------
# studies in storage


@contextlib.contextmanager
def _stable():
    """Heartbeats and retries have been marked experimental in Optuna since 2.8; do not warn each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats; stale trials are re-queued. SQLite waits up to 60 s for a lock."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":  # a new database file's folder
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with _stable():
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())


class CoverageGridSampler(optuna.samplers.BaseSampler):
    """Gives each new tuned trial `next_grid_point`: the grid in grid_order, minus the points claimed
    trials hold. Two processes sampling at once may draw the same point; the objective fails the
    higher-numbered trial as surplus once both points are stored, and its process samples again (if the
    lower one stores its point only after the higher one has checked, the point runs twice: a wasted
    run, not a wrong result). Optuna's GridSampler draws in a seeded random order, so a small budget can
    spend every trial on one side of the scaled LR."""

    def __init__(self, spec: StudySpec, warmup_epochs: float):
        self.spec, self.warmup_epochs = spec, warmup_epochs

    def infer_relative_search_space(self, study, trial) -> dict:
        return {"lr_multiplier": optuna.distributions.FloatDistribution(*self.spec.lr_range, log=True),
                "warmup_epochs": optuna.distributions.FloatDistribution(*warmup_bounds(self.spec))}

    def sample_relative(self, study, trial, search_space) -> dict:
        return next_grid_point(self.spec, self.warmup_epochs, study.get_trials(deepcopy=False)) or {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise _Surplus(f"trial {trial.number}: every grid point is claimed by another trial")


def _untuned_warmup(spec: StudySpec, rung: str, batch: int) -> float:
    """The cell's untuned warmup in epochs (0 when its config is invalid: its runs fail anyway)."""
    try:
        return cell_config(spec, rung, batch).schedule.warmup_epochs
    except ConfigError:
        return 0.0


def _sampler(spec: StudySpec, warmup_epochs: float, salt: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return CoverageGridSampler(spec, warmup_epochs)
    # a seed per trial and worker: a restarted or parallel process must not replay the same draws
    return optuna.samplers.TPESampler(seed=spec.seed * 1_000_003 + salt,
                                      n_startup_trials=min(10, max(2, spec.trials // 2)))


def study_name(name: str, rung: str, batch: int) -> str:
    return f"{name}/{rung}/b{batch}"


def _cells(spec: StudySpec) -> list[tuple[str, int]]:
    return [(rung, batch) for rung in spec.rungs for batch in spec.batch_sizes]


def _fill_cell(spec: StudySpec, storage: optuna.storages.RDBStorage, name: str, rung: str, batch: int,
               worker: int) -> None:
    """Run trials of one (rung, batch) study until none is left to claim."""
    current: dict = {}
    objective = _objective(spec, name, rung, batch, current)
    study = optuna.load_study(study_name=study_name(name, rung, batch), storage=storage)
    warmup = _untuned_warmup(spec, rung, batch)
    while True:
        with _stable():
            optuna.storages.fail_stale_trials(study)  # killed processes' trials -> FAIL + a WAITING copy
        trials = study.get_trials(deepcopy=False)
        study.sampler = _sampler(spec, warmup, salt=worker * 10_007 + len(trials))
        if any(t.state == TrialState.WAITING for t in trials):
            pass  # optimize() pops the waiting trial first
        elif _claimed(trials, tuned=False) < 1:
            study.enqueue_trial({}, user_attrs={"tuned": False})
        elif (short := next_top_up(spec, trials)) is not None:
            base, seeds = short
            study.enqueue_trial(base.params, user_attrs={"tuned": base.user_attrs.get("tuned", True),
                                                         "top_up_of": base.number, "seeds": seeds,
                                                         "run_number": _run_number(base)})
        elif _claimed(trials, tuned=True) >= trials_of(spec, rung):
            return
        elif spec.sampler == "grid" and next_grid_point(spec, warmup, trials) is None:
            return  # claimed trials of an earlier, different grid hold the rest of the budget
        try:
            study.optimize(objective, n_trials=1, catch=(_Surplus,))
        except (Stopped, KeyboardInterrupt):
            failed = [t for t in study.get_trials() if t.number == current.get("number")]
            if failed and failed[0].state == TrialState.FAIL:
                with _stable():
                    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, failed[0])  # resume it next time
            raise


def _work(spec: StudySpec, storage_url: str, name: str, worker: int = 0, threads: int = 0) -> None:
    """Run every trial that can be claimed in every (rung, batch) study; a worker process's entry point."""
    if threads:
        torch.set_num_threads(threads)
    storage = open_storage(storage_url)
    for rung, batch in _cells(spec):
        _fill_cell(spec, storage, name, rung, batch, worker)


def _unfinished(spec: StudySpec, storage: optuna.storages.RDBStorage, name: str) -> list[str]:
    """Studies still short of finished trials (the rest run in other processes, or went stale)."""
    out = []
    for rung, batch in _cells(spec):
        n = study_name(name, rung, batch)
        done = optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False, states=_DONE)
        if (_claimed(done, tuned=False) < 1 or _claimed(done, tuned=True) < trials_of(spec, rung)
                or next_top_up(spec, done) is not None):
            out.append(n)
    return out


def _spawn(spec: StudySpec, storage: str, name: str, workers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_work, args=(spec, storage, name, i, threads)) for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"study worker {bad[0][0]} exited with code {bad[0][1]} (see its output above)")


def run_study(spec: StudySpec, storage: str, name: str, workers: int = 1) -> list[dict]:
    """Run (or resume) the sweep in `storage` (an SQLAlchemy URL) and return all its trial records.

    workers > 1 runs that many spawned processes, each with cpu_count // workers torch threads,
    all working on the same studies through the storage; workers = 1 runs in this process. When
    other processes (or killed ones, until their trials go stale) hold the last trials, it polls
    every POLL_S seconds and runs whatever is re-queued.
    """
    if "/" in name or not name:
        raise ConfigError(f"study name {name!r} is invalid: use a plain name without '/'")
    store = open_storage(storage)
    for cell in _cells(spec):  # created here, before any worker starts: concurrent creation races on SQLite
        optuna.create_study(storage=store, study_name=study_name(name, *cell), direction="maximize",
                            load_if_exists=True)
    while True:
        if workers <= 1:
            _work(spec, storage, name)
        else:
            _spawn(spec, storage, name, workers)
        waiting = _unfinished(spec, store, name)
        if not waiting:
            break
        print(f"[largebatch] {', '.join(waiting)}: waiting for trials running elsewhere (a killed process's "
              f"trials are re-queued {GRACE_S} s after its last heartbeat)", flush=True)
        time.sleep(POLL_S)
    return [r for cell in _cells(spec)
            for r in _records(optuna.load_study(study_name=study_name(name, *cell), storage=store))]


def _records(study: optuna.Study) -> list[dict]:
    return [r for t in study.get_trials(deepcopy=False, states=_DONE) for r in t.user_attrs.get("records", [])]


def load_records(storage: str, name: str) -> list[dict]:
    """Every trial record of study `name` in `storage` (finished trials only), study by study."""
    store = open_storage(storage)
    names = [s for s in optuna.get_all_study_names(store) if s.startswith(f"{name}/")]
    if not names:
        raise ValueError(f"no study named {name!r} in {storage}")
    return [r for s in names for r in _records(optuna.load_study(study_name=s, storage=store))]


def import_records(spec: StudySpec, storage: str, name: str, records: list[dict]) -> int:
    """Rebuild study `name`'s trials from `records` (a report's trials.csv, see `report.read_csv`): every
    (rung, batch) in the records, also those `spec` does not run (the report reads all), whose study holds
    no trials yet; return how many trials were added.

    Records of one (rung, batch, trial) become one finished trial holding all their seeds, at the same
    trial number (numbers the records skip become failed placeholders), with the spec's parameter
    ranges: a tuned point outside them is a ConfigError. A study with trials is left as it is, so
    importing twice adds nothing. Import before other processes work on the storage: two imports at
    once can both find a study empty.
    """
    groups: dict[tuple[str, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["study"] == name:
            groups[(r["rung"], r["batch_size"])][r["trial"]].append(r)
    if records and not groups:
        studies = sorted({r["study"] for r in records})
        raise ConfigError(f"the trials to import hold no study {name!r} (they hold {', '.join(studies)}); "
                          f"pass --name with one of those")
    dists = {"lr_multiplier": optuna.distributions.FloatDistribution(*spec.lr_range, log=True),
             "warmup_epochs": optuna.distributions.FloatDistribution(*warmup_bounds(spec))}
    for (rung, batch), trials in groups.items():  # every point is checked before anything is written
        for number, recs in trials.items():
            for k in dists if recs[0]["tuned"] else ():
                v = recs[0][k]
                if v is None or not dists[k].low <= v <= dists[k].high:
                    raise ConfigError(f"{study_name(name, rung, batch)} trial {number}: {k} {v} lies outside this "
                                      f"study's range [{dists[k].low:g}, {dists[k].high:g}]; give the study the "
                                      f"--lr-range/--warmup-range it ran with")
    store = open_storage(storage)
    added = 0
    for (rung, batch), trials in sorted(groups.items()):
        study = optuna.create_study(storage=store, study_name=study_name(name, rung, batch), direction="maximize",
                                    load_if_exists=True)
        if study.get_trials(deepcopy=False):
            continue
        for number in range(max(trials) + 1):
            recs = sorted(trials.get(number, []), key=lambda r: r["seed"])
            if not recs:
                study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"placeholder": True}))
                continue
            tuned = bool(recs[0]["tuned"])
            params = {k: recs[0][k] for k in dists} if tuned else {}
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=sum(score(r) for r in recs) / len(recs), params=params,
                distributions={k: dists[k] for k in params}, user_attrs={"tuned": tuned, "records": recs}))
            added += 1
    return added
