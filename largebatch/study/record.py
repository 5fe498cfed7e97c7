"""The trial record: one training run of a study, the one currency of `largebatch.study`.

The sweep writes one `TrialRecord` per seed of a trial (into the trial's Optuna user attribute "records",
as `asdict`), the report writes them to trials.csv (`write_csv`) and reads them back (`read_csv`),
`import_records` rebuilds studies from them, and `regimes` decides B_L, B_H, B_F from them. The fields of
`TrialRecord` are the schema: the CSV columns are its fields in order (`FIELDS`), their types its annotations.

Each record carries its task's primary metric (`metric`: "accuracy" for classification, "loss" for
regression and language modelling) and its direction (`higher_is_better`); `test_metric` and `val_metric`
are the metric's final values. Records written before tasks existed (a trials.csv or Optuna attributes
without a `metric`) are classification records: accuracy, higher is better, read from
`test_accuracy`/`val_accuracy`; their `target_accuracy` is read as `target`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from largebatch.config import ConfigError

STATUSES = ("completed", "diverged", "failed", "stopped", "pruned")
"""Every status a record has: completed (a result), diverged and failed (`DIVERGED`), stopped (interrupted by a
stop request: re-queued, not a result) and pruned (`PRUNED`)."""
DIVERGED = ("diverged", "failed")
"""Statuses of a run that ended without a result: it scores the metric's worst value."""
PRUNED = "pruned"
"""Status of a run its trial's pruner stopped early (`largebatch study --pruner`; its Optuna trial is PRUNED): neither
a result nor diverged. Regimes leave it out as incomplete; the report counts it on its own."""

REACHED = "reached the baseline's threshold"
"""How the message of a "completed" run begins that `largebatch study --stop-when-decided` stopped where it reached
the baseline's threshold (`largebatch.study.decide`): its values are those there."""


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One finished (or failed) training run of a study. See the module docstring."""

    study: str
    """Study name."""
    rung: str
    """Technique: an optimizer name ("sgd", "lars", ...) or a ladder rung ("+warmup", "+lars", ...)."""
    batch_size: int
    """Global batch B."""
    seed: int
    trial: int = 0
    """The trial's number in its (rung, batch) study: the t<trial> of its run directory."""
    tuned: bool
    """False for the untuned point (the rung's base LR scaled linearly to B), True for a tuned (LR, warmup) point."""
    lr_multiplier: float | None = None
    """The tuned point's multiplier on the linearly scaled LR (1 untuned)."""
    base_lr: float | None = None
    """LR at `reference_batch`."""
    reference_batch: int | None = None
    peak_lr: float | None = None
    """The LR actually used at B."""
    warmup_epochs: float | None = None
    epochs: float | None = None
    """Training budget in epochs."""
    status: str
    """One of STATUSES."""
    metric: str = "accuracy"
    """The task's primary metric, by which the study is decided."""
    higher_is_better: bool = True
    """Direction of `metric`: True for accuracy, False for a loss."""
    test_metric: float | None = None
    """Final test value of `metric` (None unless completed)."""
    val_metric: float | None = None
    """Final validation value of `metric` (None without a validation split)."""
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    val_loss: float | None = None
    train_loss: float | None = None
    """Last logged training loss."""
    steps: int = 0
    """Optimizer steps run."""
    steps_to_target: int | None = None
    """First evaluated step whose validation (else test) metric reaches `target` (>=, or <= for lower-is-better)."""
    target: float | None = None
    """The target value of `metric` for steps_to_target (None: not measured)."""
    wall_seconds: float = 0.0
    run_dir: str = ""
    message: str = ""
    """Why a run failed, diverged or stopped."""

    @property
    def reached_early(self) -> bool:
        """Whether `largebatch study --stop-when-decided` stopped this run where it reached the baseline's threshold
        (a result: its values are those there)."""
        return self.status == "completed" and self.message.startswith(REACHED)

    @property
    def lr(self) -> float | None:
        """The LR identifying the tuning point: peak_lr, else base_lr."""
        return self.peak_lr if self.peak_lr is not None else self.base_lr

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialRecord:
        """A record from `asdict` output or an older dict (see the module docstring); unknown keys are ignored."""
        d = dict(d)
        if "target_accuracy" in d and "target" not in d:
            d["target"] = d.pop("target_accuracy")
        if d.get("metric") is None:  # written before tasks: classification
            d.update(metric="accuracy", higher_is_better=True, test_metric=d.get("test_accuracy"),
                     val_metric=d.get("val_accuracy"))
        return cls(**{k: v for k, v in d.items() if k in FIELDS})


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord))
"""The schema: the record's fields in order, the columns of trials.csv."""
REQUIRED: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord)
                                  if f.default is dataclasses.MISSING)
"""Columns a trials.csv must have (the rest default, as in one written before they existed)."""


def worst(higher_is_better: bool) -> float:
    """The score of a run without a result: 0 for a higher-is-better metric (taken to be a score >= 0, such as
    accuracy), +inf for a lower-is-better one (a loss)."""
    return 0.0 if higher_is_better else math.inf


def reaches(value: float, target: float, higher_is_better: bool) -> bool:
    """Whether `value` reaches `target`: >= for a higher-is-better metric, <= for a lower-is-better one."""
    return value >= target if higher_is_better else value <= target


def score(record: TrialRecord) -> float:
    """A record's objective value: its final validation metric (test metric without a validation split);
    `worst` unless completed. Optuna maximises it for a higher-is-better metric and minimises it otherwise."""
    value = record.val_metric if record.val_metric is not None else record.test_metric
    if record.status != "completed" or value is None:
        return worst(record.higher_is_better)
    return value


def study_metric(records: Iterable[TrialRecord]) -> tuple[str, bool]:
    """The (metric, higher_is_better) all records share; ("accuracy", True) for none. ValueError if they differ."""
    kinds = {(r.metric, r.higher_is_better) for r in records}
    if len(kinds) > 1:
        raise ValueError(f"the records mix metrics {sorted(kinds)}: a study is decided on one metric")
    return kinds.pop() if kinds else ("accuracy", True)


# ---------------------------------------------------------------------------------------------
# trials.csv


def write_csv(records: Iterable[TrialRecord], path: Path) -> None:
    """Every record as a row of FIELDS; None is an empty cell."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in records:
            w.writerow(["" if v is None else v for v in dataclasses.astuple(r)])


def _casts() -> dict[str, Callable[[str], Any]]:
    """Per field, the function from a CSV cell to its annotated type (the non-None member of a union)."""
    bools: Callable[[str], Any] = {"True": True, "False": False}.__getitem__
    out = {}
    for name, hint in typing.get_type_hints(TrialRecord).items():
        kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        out[name] = bools if kind is bool else kind
    return out


def read_csv(path: str | Path) -> list[TrialRecord]:
    """The records of a trials.csv that `write_csv` wrote, also one of an older version (see the module
    docstring). An empty number or flag is None, an empty text ""; columns that are no field are ignored.

    A missing file, a missing required column or a value of the wrong type is a one-line ConfigError.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the trials.csv that `largebatch report` wrote")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in REQUIRED if k not in (rows[0] if rows else {})]
    if missing:
        raise ConfigError(f"{path}: not a trials.csv of `largebatch report` (no column {', '.join(missing)})")
    casts = _casts()
    out = []
    for line, row in enumerate(rows, start=2):
        values: dict[str, Any] = {}
        for k, v in row.items():
            cast = casts.get(k if k != "target_accuracy" else "target")
            if cast is None:
                continue
            try:
                values[k] = ("" if cast is str else None) if v == "" else cast(v)
            except (ValueError, KeyError):
                kind = "True/False" if not isinstance(cast, type) else cast.__name__
                raise ConfigError(f"{path}:{line}: column {k} has {v!r}, which is not a valid {kind}") from None
        out.append(TrialRecord.from_dict(values))
    return out
