"""One training run of a study -> one `TrialRecord`; steps to a target from the run's metrics.jsonl.

A run directory with a finished summary.json is reused, one with a checkpoint is resumed, and anything a run
raises becomes a record of status "failed" (an invalid combination is a result of its point, not an error of
the study). The record's metric is the study's (`StudySpec.metric`): its final values are the summary's
`test_{metric}` and `val_{metric}`.

Under a pruner the run reports its curve through the trainer's `on_eval` hook (`Curve`): the study's metric at each
evaluation (the validation value when there is one, as `record.score` reads the final one), at the evaluation's
index (the multiple of `eval.every_epochs` it reached: the epoch, when evaluating every epoch, so the pruner's
resources are epochs in every (rung, batch) cell); a run the pruner stops ends with its checkpoint and metrics
written and becomes a record of status "pruned". Under `largebatch study --stop-when-decided` the same hook asks
`largebatch.study.decide` at each evaluation: a run that reached the baseline's threshold ends as "completed" with
its values there, one whose calls another run decided as "pruned".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from largebatch import checkpoint
from largebatch.batch import scale_lr
from largebatch.config import RunConfig
from largebatch.metrics import read_metrics
from largebatch.rundir import check_same_run
from largebatch.study.record import PRUNED, TrialRecord, reaches
from largebatch.study.spec import StudySpec, cell_config, run_config
from largebatch.trainer import train


Report = Callable[[float, int], bool]
"""`report(value, index)`: tell the trial one evaluation of its run; True when its pruner says stop."""
Decide = Callable[[dict], tuple[str, str]]
"""`decide(metrics)`: at one evaluation, ("completed", why) when the run reached what its study asks and stops
there, ("pruned", why) when it is no longer needed, ("", "") to go on (`largebatch.study.decide`)."""


class Curve:
    """The `on_eval` hook of a run under a pruner or `decide`: reports each evaluation's value of `metric` (val_, else
    test_) at its index (module doc) when `report` is given, and asks the run to stop when `report` or `decide` says
    so; `pruned` and `reached` say why it did ("": it did not)."""

    def __init__(self, report: Report | None, metric: str, every_epochs: float, decide: Decide | None = None) -> None:
        self.report, self.decide, self.metric, self.every = report, decide, metric, every_epochs
        self.index, self.pruned, self.reached = 0, "", ""

    def __call__(self, step: int, epoch: float, metrics: dict) -> str:
        value = metrics.get(f"val_{self.metric}", metrics.get(f"test_{self.metric}"))
        reached = math.floor(epoch / self.every + 1e-9) if self.every else 0
        self.index = max(reached, self.index + 1)  # the final evaluation off the grid takes the next index
        if not isinstance(value, (int, float)):
            return ""
        where = f"at epoch {epoch:.2f} (evaluation {self.index}, {self.metric} {value:.4g})"
        prune = self.report is not None and self.report(float(value), self.index)  # the pruner sees every value
        kind, why = self.decide(metrics) if self.decide is not None else ("", "")
        if kind == "completed":  # a run that decided its call ends with a result, whatever the pruner says
            self.reached = f"{why} at epoch {epoch:.2f}"
        elif prune or kind == PRUNED:
            self.pruned = f"pruned {where}" + (f": {why}" if kind == PRUNED and not prune else "")
        return self.pruned or self.reached


def _run(cfg: RunConfig, on_eval: Curve | None = None) -> dict:
    """Train `cfg`, reusing a finished summary.json in its directory or resuming its checkpoint."""
    run_dir = Path(cfg.output.dir) / cfg.output.name
    path = run_dir / "summary.json"
    if path.is_file():
        check_same_run(run_dir, cfg)  # a directory left by another study (storage deleted) is not reused
        summary = json.loads(path.read_text())
        if summary["status"] in ("completed", "diverged"):
            return summary
    hook = {} if on_eval is None else {"on_eval": on_eval}  # without a pruner, train() is called as it always was
    return train(cfg, resume=checkpoint.latest(run_dir) is not None, **hook)


def steps_to_target(run_dir: Path, target: float, metric: str, higher_is_better: bool) -> int | None:
    """First evaluated step whose validation `metric` (the test one without a validation split) reaches
    `target`: >= for a higher-is-better metric, <= otherwise (Shallue et al. 2019's steps to result)."""
    for r in read_metrics(run_dir):
        value = r.get(f"val_{metric}", r.get(f"test_{metric}"))
        if isinstance(value, (int, float)) and reaches(value, target, higher_is_better):
            return r["step"]
    return None


def retarget(record: TrialRecord, target: float) -> TrialRecord:
    """`record` measured against another target value of its metric, from its run's metrics.jsonl (a completed run,
    or a pruned one up to where it stopped); one whose directory is not on this machine keeps its own target and
    steps."""
    run_dir = Path(record.run_dir)
    if record.status not in ("completed", PRUNED):
        return replace(record, target=target, steps_to_target=None)
    if not record.run_dir or not (run_dir / "metrics.jsonl").is_file():
        return record
    steps = steps_to_target(run_dir, target, record.metric, record.higher_is_better)
    return replace(record, target=target, steps_to_target=steps)


def run_record(spec: StudySpec, name: str, rung: str, batch: int, trial: int, seed: int, tuned: bool,
               lr_multiplier: float, warmup_epochs: float | None, report: Report | None = None,
               decide: Decide | None = None) -> TrialRecord:
    """Run (or reuse) one training run and return its trial record; exceptions become status "failed". With
    `report`, the run reports its curve and stops when told (status "pruned"; module doc); with `decide`, it stops
    when that says so: "completed" with its values at that evaluation, or "pruned"."""
    run_dir = Path(spec.output_dir) / name / rung / f"b{batch}" / f"t{trial}-s{seed}"
    cfg, summary, message, t0 = None, {}, "", time.perf_counter()
    try:
        cfg = run_config(cell_config(spec, rung, batch), lr_multiplier, warmup_epochs, seed, run_dir)
        hooked = report is not None or decide is not None
        curve = Curve(report, spec.metric, cfg.eval.every_epochs, decide) if hooked else None
        summary = _run(cfg, curve)
        status, message = summary["status"], summary.get("message", "")
        if status == "stopped" and curve is not None and (curve.pruned or curve.reached):
            status, message = (PRUNED, curve.pruned) if curve.pruned else ("completed", curve.reached)
        if summary.get("metric", spec.metric) != spec.metric:  # the study's Optuna direction rests on it
            status, message = "failed", f"the run's task is scored by {summary['metric']}, the study by {spec.metric}"
    except Exception as e:  # an invalid combination or a crash is a result of this point, not of the study
        status, message = "failed", f"{type(e).__name__}: {e}"
    done = status == "completed"
    losses = [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r] if run_dir.is_dir() else []
    opt = cfg.optimizer if cfg is not None else None
    final = {k: _finite(summary.get(k)) if done else None
             for k in ("test_accuracy", "val_accuracy", "test_loss", "val_loss",
                       f"test_{spec.metric}", f"val_{spec.metric}")}
    return TrialRecord(
        study=name, rung=rung, batch_size=batch, seed=seed, trial=trial, tuned=tuned, lr_multiplier=lr_multiplier,
        base_lr=opt.base_lr if opt else None, reference_batch=opt.reference_batch if opt else None,
        peak_lr=summary.get("peak_lr") or (scale_lr(opt.base_lr, batch, opt.reference_batch, opt.scaling)
                                           if opt else None),
        warmup_epochs=cfg.schedule.warmup_epochs if cfg else warmup_epochs, epochs=spec.epochs, status=status,
        metric=spec.metric, higher_is_better=spec.higher_is_better,
        test_metric=final[f"test_{spec.metric}"], val_metric=final[f"val_{spec.metric}"],
        test_accuracy=final["test_accuracy"], val_accuracy=final["val_accuracy"],
        test_loss=final["test_loss"], val_loss=final["val_loss"],
        train_loss=_finite(losses[-1]) if losses else None, steps=summary.get("steps", 0),
        steps_to_target=(steps_to_target(run_dir, spec.target, spec.metric, spec.higher_is_better)
                         if status in ("completed", PRUNED) and spec.target is not None else None),
        target=spec.target, wall_seconds=summary.get("wall_seconds", time.perf_counter() - t0),
        run_dir=str(run_dir), message=message)


def _finite(x: Any) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
