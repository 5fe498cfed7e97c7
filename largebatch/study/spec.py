"""What a study runs: its spec, the rungs, each (rung, batch) cell's config and the tuning grid.

Pure functions of the spec and the recipe's config: no storage, no training. `largebatch.study.sweep` runs
them; the grid's order is `grid_order` (coverage first, so a small budget brackets the scaled LR on both
sides).

    spec = StudySpec(recipe="mnist-lenet", batch_sizes=(256, 4096), rungs=("sgd", "lars"), epochs=30,
                     trials=8, seeds=3, target=0.99)
    cell_config(spec, "lars", 4096)     # the untuned RunConfig of one cell
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from largebatch.config import OPTIMIZERS, SCALINGS, ConfigError, RunConfig, ScheduleConfig, _require, from_dict, to_dict
from largebatch.recipes import get_recipe
from largebatch.study.recipe import load_recipe, task_metric

PRUNERS = ("none", "median", "halving", "hyperband")
"""`StudySpec.pruner` choices: none, or Optuna's MedianPruner, SuccessiveHalvingPruner, HyperbandPruner
(`largebatch.study.sweep.make_pruner`)."""
LARS_RECIPE = "mnist-lenet-lars-8k"  # the optimizer and decay of the `lars` rung on a non-LARS recipe


@dataclass
class StudySpec:
    """What to sweep: a recipe over batch sizes and rungs, with a tuning budget per (rung, batch)."""

    recipe: str
    """Recipe reference (`largebatch.study.recipe`): a named recipe (`largebatch recipes`), `module:function` or
    `file.py[:function]`; its base LR at its reference batch is the untuned point."""
    batch_sizes: tuple[int, ...]
    """Global batch sizes B."""
    rungs: tuple[str, ...] = ("sgd",)
    """Rung names from RUNGS: optimizers (sgd, lars, lamb, adam, adamw, adagrad, rmsprop)."""
    epochs: float = 30.0
    """Training budget of every run, in epochs; the recipe's schedule (warmup, milestones) is stretched to it."""
    trials: int = 8
    """Tuned trials per (rung, batch), beyond the untuned one."""
    seeds: int = 1
    """Seeds (0 .. seeds-1) per trial; the objective is the mean of the task's metric over them."""
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
    target: float | None = None
    """Value of the task's metric whose first crossing (>=, or <= for a lower-is-better metric) gives a record's
    steps_to_target (None: not measured)."""
    output_dir: str = "runs"
    """Run directories go under output_dir/<study name>/<rung>/b<B>/t<trial>-s<seed>."""
    extra: dict[str, Any] = field(default_factory=dict)
    """RunConfig overrides by field path: {"data.train_limit": 1024, "threads": 1} for every run; a path prefixed
    with a rung name and a colon applies to that rung's runs only, after the others: {"lamb:optimizer.base_lr":
    0.01} (a rung borrowing another optimizer keeps the recipe's LR, which is rarely that optimizer's)."""
    lr_scaling: str = "linear"
    """How the untuned point's LR scales from the recipe's reference batch to B: `linear` (You et al. 2020's
    definition of B_L), `sqrt` (the usual rule for Adam-family optimizers) or `none`; the tuned points multiply
    it by `lr_range`."""
    seed: int = 0
    """Seed of TPE's draws (the grid order is fixed)."""
    base: RunConfig | None = None
    """The recipe's config; None: `load_recipe(recipe)`, once, here. Spawned workers get it as it is, so a recipe
    file's function runs in this process only."""
    metric: str | None = None
    """The metric deciding the study; None: the primary metric of the recipe's task (`task_metric`)."""
    higher_is_better: bool | None = None
    """Direction of `metric` (Optuna maximises or minimises it); None: the task's."""
    pruner: str = "none"
    """One of PRUNERS: stop hopeless tuned trials early on their evaluation curves (successive halving, Jamieson &
    Talwalkar 2016; Hyperband, Li et al. 2018; or the median rule); none: every run trains its whole budget."""
    decide: bool = False
    """Stop runs, and skip trials, once nothing they could show changes B_L or B_H (`largebatch.study.decide`): only
    the baseline runs at B0, a run reaching the baseline's threshold stops there, and a batch whose B_H call is
    decided runs nothing more but what its B_L call still needs."""
    tolerance: float | None = None
    """Relative tolerance of "keeps the baseline A" that `decide` stops runs at (`regimes.threshold`); None: the
    default of the metric's direction (`regimes.TOLERANCE`). Report the study with the same `--tolerance`."""
    heartbeat: int = 60
    """Seconds between a running trial's heartbeats in the storage; a trial silent for 3 of them belongs to a killed
    process and is re-queued (`largebatch.study.storage`). Every process sharing the study must use the same (the
    storage records it, and a different one is refused)."""

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
        _require(self.pruner in PRUNERS, "pruner", self.pruner, f"choose from {', '.join(PRUNERS)}")
        _require(isinstance(self.heartbeat, int) and self.heartbeat >= 1, "heartbeat", self.heartbeat,
                 "give whole seconds >= 1")
        _require(self.tolerance is None or 0 <= self.tolerance < 1, "tolerance", self.tolerance,
                 "give a relative tolerance in [0, 1), e.g. 0.01")
        _require(0 < self.lr_range[0] <= self.lr_range[1], "lr_range", self.lr_range, "need 0 < low <= high")
        _require(0 <= self.warmup_range[0] <= self.warmup_range[1] <= 1, "warmup_range", self.warmup_range,
                 "need 0 <= low <= high <= 1 (fractions of epochs)")
        _require(min(self.lr_points, self.warmup_points) >= 1, "lr_points, warmup_points",
                 (self.lr_points, self.warmup_points), "must be >= 1")
        grid = len(lr_grid(self)) * len(warmup_grid(self))
        _require(self.sampler != "grid" or self.trials <= grid, "trials", self.trials,
                 f"exceeds the grid of {grid} points: lower trials, add lr_points/warmup_points, or use sampler tpe")
        _require(self.lr_scaling in SCALINGS, "lr_scaling", self.lr_scaling, f"choose from {', '.join(SCALINGS)}")
        for path in self.extra:
            rung, sep, _ = path.rpartition(":")
            _require(not sep or rung in self.rungs, "extra", path,
                     f"names rung {rung!r}, which the study does not run ({', '.join(self.rungs)})")
        for rung in (None, *self.rungs):  # unknown field paths fail here, before any run
            _set_paths(to_dict(RunConfig()), overrides_of(self.extra, rung))
        if self.base is None:
            self.base = load_recipe(self.recipe)
        if self.metric is None or self.higher_is_better is None:
            self.metric, self.higher_is_better = task_metric(apply_overrides(self.base, overrides_of(self.extra, None)))


def study_name(name: str, rung: str, batch: int) -> str:
    """The Optuna study of one (rung, batch) cell of study `name` in its storage."""
    return f"{name}/{rung}/b{batch}"


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


def trials_of(spec: StudySpec, rung: str) -> int:
    """Tuned trials a (rung, batch) study runs."""
    return 0 if rung in UNTUNED_RUNGS else spec.trials


def rung_config(base_cfg: RunConfig, rung: str, batch: int) -> RunConfig:
    """`base_cfg` changed by `rung` (see RUNGS) at global batch `batch`; raises ConfigError if invalid."""
    if rung not in RUNGS:
        raise ConfigError(f"rung {rung!r} is unknown: choose from {', '.join(RUNGS)}")
    cfg = RUNGS[rung](base_cfg)
    return replace(cfg, batch=replace(cfg.batch, global_batch=batch))


def overrides_of(extra: dict[str, Any], rung: str | None) -> dict[str, Any]:
    """The overrides of `extra` (StudySpec.extra) that apply to `rung`'s runs, unprefixed, rung-scoped ones last
    (None: those for every run)."""
    common = {k: v for k, v in extra.items() if ":" not in k}
    scoped = {k.partition(":")[2]: v for k, v in extra.items() if rung is not None and k.partition(":")[0] == rung}
    return {**common, **scoped}


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
    """The untuned config of one (rung, batch): recipe -> rung -> budget, LR scaling -> the rung's overrides."""
    cfg = rung_config(spec.base, rung, batch)
    cfg = replace(cfg, epochs=spec.epochs, schedule=stretch_schedule(cfg.schedule, spec.epochs / cfg.epochs),
                  optimizer=replace(cfg.optimizer, scaling=spec.lr_scaling))
    return apply_overrides(cfg, overrides_of(spec.extra, rung))


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


