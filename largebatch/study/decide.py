"""Stopping a study's runs once the calls they serve are decided (`largebatch study --stop-when-decided`).

A batch-size study asks two questions of each batch B (You et al. 2020; `largebatch.study.regimes`): does the
baseline rung's untuned run keep the baseline A (the B_L call), and does any run reach A's threshold (the B_H
call)? A run serves one or both of them, and most runs go on long after their answer is known. With
`StudySpec.decide`, the study stops a run, and skips a trial it has not started, as soon as nothing it could still
show can change B_L or B_H:

- **B0 is decided before anything runs**: the baseline (the first rung's untuned trial at the smallest batch)
  keeps and reaches itself by definition, so it is the only trial of B0 that runs, to the end: it defines A (and
  xi, the loss the B_L call also bounds). Tuned points and other rungs at B0 are not run, so the report's note on
  a tuned point beating the baseline at B0 cannot be made.
- **A run that reaches the threshold stops there** (a record "completed" at that evaluation, its message starting
  with REACHED): reaching A within the budget decides the B_H call of its batch, and for the baseline rung's
  untuned run also the B_L call, once its loss is within 1.2 xi as well.
- **Once a batch's B_H call is decided**, its other runs stop (status "pruned") and its unstarted trials are
  skipped, except the baseline rung's untuned run while the B_L call at this batch is still open, i.e. no smaller
  batch's untuned run has already ended B_L by failing.

Runs failing to reach the threshold are not stopped by this module: that is the pruner's and the give-up rule's
job. The judgement uses the values the pruner sees (`runs.Curve`: validation, else test, as `record.score`), the
threshold of `regimes.threshold` at the study's tolerance (`StudySpec.tolerance`, default `regimes.TOLERANCE`) and
the baseline trial's value (the mean of its seeds' scores). Values of stopped runs are those at their stop, not at
the end of the budget; the report says how many runs stopped so. Report such a study with the same `--tolerance`
(a report with a stricter one notes the stopped runs that do not reach its threshold), and with the first rung as
`--baseline` (the report's default picks it: it is the only untuned rung at B0).
"""

from __future__ import annotations

import math
from typing import Mapping

from largebatch.extras import require
from largebatch.study.record import REACHED, reaches
from largebatch.study.regimes import LOSS_FACTOR, TOLERANCE, threshold
from largebatch.study.spec import StudySpec, study_name

optuna = require("study", "optuna", "the batch-size study (largebatch.study.decide)")


def _loss(values: Mapping) -> float | None:
    """The loss the B_L call bounds: validation, else test (as `regimes.choose_loss_metric` prefers)."""
    v = values.get("val_loss")
    v = values.get("test_loss") if v is None else v
    return float(v) if isinstance(v, (int, float)) else None


class Decisions:
    """The calls of study `name` in `storage` (an Optuna storage object) as far as its finished trials decide them."""

    def __init__(self, spec: StudySpec, storage, name: str) -> None:
        self.spec, self.storage, self.name = spec, storage, name
        self.b0, self.rung0 = min(spec.batch_sizes), spec.rungs[0]
        self._base: tuple[float, float] | None = None  # (A, xi), once the baseline trial has finished

    def _trials(self, rung: str, batch: int) -> list:
        try:
            study = optuna.load_study(study_name=study_name(self.name, rung, batch), storage=self.storage)
        except KeyError:  # not created (yet)
            return []
        return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def baseline(self) -> tuple[float, float] | None:
        """(A, xi) of the finished baseline trial, None until it has finished (or when it diverged: then nothing is
        decided early). xi is nan without a finite loss in its records."""
        if self._base is None:
            for t in self._trials(self.rung0, self.b0):
                records = t.user_attrs.get("records", [])
                if t.user_attrs.get("tuned", True) or t.user_attrs.get("top_up_of") is not None or not records:
                    continue
                if any(r["status"] != "completed" for r in records):
                    return None
                losses = [x for x in map(_loss, records) if x is not None and math.isfinite(x)]
                xi = math.fsum(losses) / len(losses) if len(losses) == len(records) else math.nan
                self._base = (float(t.value), xi)
        return self._base

    def threshold(self) -> float | None:
        """The worst value that still reaches A (`regimes.threshold` at the study's tolerance); None while A is
        unknown."""
        base, higher = self.baseline(), self.spec.higher_is_better
        tolerance = TOLERANCE[higher] if self.spec.tolerance is None else self.spec.tolerance
        return None if base is None else threshold(base[0], higher, tolerance)

    def _reaches(self, value: float | None) -> bool:
        thr = self.threshold()
        return thr is not None and value is not None and math.isfinite(value) \
            and reaches(value, thr, self.spec.higher_is_better)

    def _keeps_loss(self, loss: float | None) -> bool:
        """Whether `loss` is within 1.2 xi (always, when the metric is the loss itself or xi is unknown)."""
        xi = self.baseline()[1]
        if self.spec.metric == "loss" or math.isnan(xi):
            return True
        return loss is not None and loss <= LOSS_FACTOR * xi

    def reached_by(self, batch: int) -> str:
        """Which finished trial at `batch` decided its B_H call by reaching the threshold ("": none yet)."""
        if batch == self.b0:
            return f"B0 = {batch}, the baseline's batch"
        for rung in self.spec.rungs:
            for t in self._trials(rung, batch):
                if self._reaches(t.value):
                    return f"{rung} trial {t.number}"
        return ""

    def b_l_ended_below(self, batch: int) -> bool:
        """Whether the baseline rung's untuned run failed at a batch between B0 and `batch`: B_L ends there."""
        for b in self.spec.batch_sizes:
            if not self.b0 < b < batch:
                continue
            for t in self._trials(self.rung0, b):
                if t.user_attrs.get("tuned", True):
                    continue
                records = t.user_attrs.get("records", [])
                losses = [_loss(r) for r in records]
                mean_loss = math.fsum(losses) / len(losses) if losses and None not in losses else None
                if not (self._reaches(t.value) and self._keeps_loss(mean_loss)):
                    return True
        return False

    def b_l_call(self, rung: str, batch: int, tuned: bool) -> bool:
        """Whether this trial is the one deciding B_L at `batch` and that call is still open."""
        return rung == self.rung0 and not tuned and batch != self.b0 and not self.b_l_ended_below(batch)

    def needed(self, rung: str, batch: int, tuned: bool) -> bool:
        """Whether a trial of (rung, batch, tuned) can still change B_L or B_H (module doc)."""
        if batch == self.b0:
            return rung == self.rung0 and not tuned
        return not self.reached_by(batch) or self.b_l_call(rung, batch, tuned)

    def verdict(self, rung: str, batch: int, tuned: bool, metrics: Mapping) -> tuple[str, str]:
        """At one evaluation of a run, ("completed", why) when it reached the threshold and its calls are decided,
        ("pruned", why) when another run decided them, ("", "") to go on."""
        if batch == self.b0 and rung == self.rung0 and not tuned:
            return "", ""  # the baseline defines A: it runs to the end
        if self.baseline() is None:
            return "", ""
        value = metrics.get(f"val_{self.spec.metric}", metrics.get(f"test_{self.spec.metric}"))
        if isinstance(value, (int, float)) and self._reaches(float(value)):
            if not self.b_l_call(rung, batch, tuned) or self._keeps_loss(_loss(metrics)):
                return "completed", f"{REACHED} {self.threshold():.4g} ({self.spec.metric} {value:.4g})"
        if not self.needed(rung, batch, tuned):
            return "pruned", f"batch {batch} decided by {self.reached_by(batch) or 'an earlier run'}"
        return "", ""
