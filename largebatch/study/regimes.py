"""Batch-size regimes from trial records: B_L, B_H, B_F (You et al. 2020), with seed noise, for any metric.

You et al. 2020, "The Limit of the Batch Size" (arXiv:2006.08517), place every batch size B in a
regime relative to a baseline run at batch B0 with test accuracy A, validation loss xi and a budget
of rho epochs:

    large               B0 <= B <= B_L   the linearly scaled LR alone keeps accuracy >= 0.995*A and
                                         loss <= 1.2*xi in rho epochs
    large-with-tuning   B_L < B <= B_H   some tried technique (warmup, LR tuning, LARS, ...) still
                                         reaches 0.995*A in rho epochs
    huge                B_H < B < B_F    nothing tried reaches it
    full                B = B_F          the training set size

Any task's primary metric takes accuracy's place (`TrialRecord.metric`, `higher_is_better`), A being the
baseline's final test value of it and the threshold a relative tolerance (`TOLERANCE`) on the side of the
worse values:

    higher is better (accuracy)   a point keeps / reaches the baseline when value >= (1 - 0.005) * A
    lower is better (a loss)      a point keeps / reaches the baseline when value <= (1 + 0.01) * A

(for a negative A the factors swap, so the threshold stays on the worse side). The loss criterion
loss <= 1.2*xi applies besides the metric unless the metric is the loss itself ("loss": regression,
language modelling), where the 1% rule on that loss replaces it.

Choices where the definitions leave room (report.md repeats them):

* An accuracy is judged on `test_metric`, the final test value (the paper's A is the test accuracy); a
  lower-is-better metric (a loss) on `val_metric`, the final validation value, when every measured
  record has one (the paper's xi is a validation loss, and a language model's study is decided on its
  validation loss), else on `test_metric` (`choose_split`). The loss criterion uses `val_loss` when every
  measured record has one, else `test_loss`.
* A "diverged" or "failed" run counts as the metric's worst value (accuracy 0, loss inf) and loss inf
  in the seed mean (and as diverged); a "stopped" (interrupted) run, or a completed one without a
  metric value, is left out as incomplete; so is a "pruned" one (stopped early by the study's pruner: no
  result, not diverged), which the per-batch rows count on its own.
* Seeds are aggregated per tuning point (rung, batch, tuned, epochs, peak_lr, warmup_epochs); per
  (rung, batch, tuned, epochs) the point with the best mean metric is kept ("best-of-tuning": the
  best over a search is biased, and its confidence interval ignores that selection).
* Only records whose `epochs` equals rho decide regimes; rho is the most common budget in the records
  unless given. Records with other budgets only feed the report's train-longer plot.
* B_L ends at the first batch (in increasing order, among those the baseline rung tried untuned) that
  fails: a larger batch that passes again does not extend it (it is labelled large-with-tuning, since
  a technique, plain linear scaling, recovers it there).
* B_H is the largest batch at which anything reaches the metric's threshold, not the end of a
  contiguous run; it uses the metric criterion only, as the definition does.
* "Inside the noise": the 95% Student-t interval of the seed mean contains the threshold (which is
  treated as exact); unknown (None) with fewer than 2 seeds; B0's own call is never inside it.
  B_L is `uncertain` when a call from B0 up to its first failure is inside the noise, B_H when the
  call at B_H or at a larger batch is (a pass is sure if one reaching group's interval clears it).
* The baseline needs a completed run: B0 defaults to the smallest batch with one.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from largebatch.study.record import DIVERGED, PRUNED, TrialRecord, reaches, study_metric, worst
from largebatch.study.stats import SeedStats, seed_stats

TOLERANCE = {True: 0.005, False: 0.01}
"""Relative tolerance of "keeps the baseline" by direction (higher_is_better): You et al. 2020's 99.5% of the
baseline accuracy, and 1% above a baseline loss."""
LOSS_FACTOR = 1.2  # You et al. 2020: ... and at most 1.2 times the baseline's loss
LARGE, RECOVERABLE, HUGE, FULL, SMALL = "large", "large-with-tuning", "huge", "full", "small"


class NoBaselineError(ValueError):
    """No record measures the metric in the study budget, so there is no baseline to compare with."""


@dataclass
class Group:
    """The best tuning point of one (rung, batch_size, tuned, epochs), aggregated over its seeds."""

    rung: str
    batch_size: int
    tuned: bool
    epochs: float | None
    peak_lr: float | None
    warmup_epochs: float | None
    value: SeedStats  # the metric (its `split` value)
    loss: SeedStats
    n_diverged: int
    n_points: int = 1  # tuning points the best was chosen from


@dataclass
class BatchRow:
    """One tried batch size: its regime, the best group, the baseline rung's untuned group, the calls."""

    batch_size: int
    regime: str
    best: Group | None  # the best mean metric over all rungs, tuned or not
    baseline: Group | None  # the baseline rung's untuned run (None if not tried here)
    keeps_baseline: bool | None  # metric within the tolerance of A and loss <= 1.2*xi (None: not tried)
    reaches: bool  # some group's mean metric reaches the threshold
    inside_noise: bool | None  # one of this batch's calls could flip within its 95% CI
    n_runs: int
    n_diverged: int
    n_incomplete: int  # stopped runs, or completed ones without a metric value
    n_pruned: int = 0  # runs the study's pruner stopped early


@dataclass
class Regimes:
    """B_L, B_H, B_F of You et al. 2020 with the baseline they are measured against; see module doc."""

    metric: str  # the deciding metric ("accuracy", "loss", ...)
    higher_is_better: bool
    tolerance: float  # relative: the threshold is A -/+ tolerance * |A|
    baseline_batch: int
    baseline_rung: str
    baseline_tuned: bool
    baseline_value: float  # A
    baseline_ci: float | None
    baseline_loss: float  # xi
    loss_metric: str
    split: str  # "test" or "val": the split whose metric decides (choose_split)
    lr_scaling: str  # how the untuned LR grew with the batch: linear, sqrt, none or mixed (`scaling_rule`)
    loss_criterion: bool  # whether loss <= 1.2*xi applies (not when the metric is the loss)
    epochs: float | None  # rho
    threshold: float  # (1 - tolerance) * A, or (1 + tolerance) * A for a lower-is-better metric
    threshold_loss: float  # 1.2 * xi (nan: not applied)
    b_l: int
    b_h: int
    b_f: int
    b_l_uncertain: bool
    b_h_uncertain: bool
    b_l_first_failure: int | None  # the batch that ended the large regime (None: never failed)
    per_batch: list[BatchRow] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)  # every group in rho epochs, for plots
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; non-finite floats (a diverged seed's inf loss) become None."""
        return _finite(asdict(self))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _key(x: Any) -> float | None:
    """A float rounded to 6 significant digits, so that 0.1*3 and 0.3 fall in one tuning point."""
    return None if x is None else float(f"{float(x):.6g}")


def _rank(value: float, higher_is_better: bool) -> float:
    """A metric value as a quantity to maximise (nan, no value, ranks last)."""
    if math.isnan(value):
        return -math.inf
    return value if higher_is_better else -value


def threshold(a: float, higher_is_better: bool, tolerance: float) -> float:
    """The worst value that still keeps baseline value `a`: (1 - tolerance) * a for a higher-is-better metric,
    (1 + tolerance) * a for a lower-is-better one (the factors swap for a negative `a`)."""
    factor = 1.0 - tolerance if higher_is_better else 1.0 + tolerance
    return a * factor if a >= 0 else a * (2.0 - factor)


def _measured(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The completed records with a metric value: those whose fields decide which split and loss a study uses."""
    return [r for r in records if r.status == "completed" and r.test_metric is not None]


def choose_loss_metric(records: Iterable[TrialRecord]) -> str:
    """'val_loss' when every completed record with a metric value has one, else 'test_loss'."""
    done = _measured(records)
    return "val_loss" if done and all(r.val_loss is not None for r in done) else "test_loss"


def scaling_rule(records: Iterable[TrialRecord]) -> str:
    """How the untuned runs' peak LR grew from base_lr at reference_batch: `linear`, `sqrt` or `none` when every
    untuned record with those numbers follows that rule (to 1e-6), `mixed` otherwise, `linear` with none to tell."""
    rules = {"linear": lambda k: k, "sqrt": math.sqrt, "none": lambda k: 1.0}
    fits = set(rules)
    for r in records:
        if not r.tuned and r.peak_lr and r.base_lr and r.reference_batch:
            k = r.batch_size / r.reference_batch
            fits &= {name for name, f in rules.items() if math.isclose(r.peak_lr, r.base_lr * f(k), rel_tol=1e-6)}
    return "linear" if fits == set(rules) else next((n for n in rules if n in fits), "mixed")


def choose_split(records: Iterable[TrialRecord]) -> str:
    """'val' for a lower-is-better metric when every completed record with a metric value has a validation value,
    else 'test' (module doc)."""
    done = _measured(records)
    loss = bool(done) and not study_metric(done)[1]
    return "val" if loss and all(r.val_metric is not None for r in done) else "test"


def measure(record: TrialRecord, loss_metric: str = "test_loss", split: str = "test"
            ) -> tuple[float, float, bool] | None:
    """(metric, loss, diverged) of one record, its metric read on `split`, or None when it is no measurement
    (see module doc)."""
    if record.status in DIVERGED:
        return worst(record.higher_is_better), math.inf, True
    value = getattr(record, f"{split}_metric")
    if record.status != "completed" or value is None:
        return None
    if not math.isfinite(value):
        return worst(record.higher_is_better), math.inf, True
    loss = getattr(record, loss_metric)
    loss = record.test_loss if loss is None else loss
    return float(value), math.nan if loss is None else float(loss), False


def aggregate(records: Iterable[TrialRecord], loss_metric: str | None = None, split: str | None = None
              ) -> list[Group]:
    """Best tuning point (by mean metric over seeds) per (rung, batch_size, tuned, epochs)."""
    records = list(records)
    higher = study_metric(records)[1]
    loss_metric = loss_metric or choose_loss_metric(records)
    split = split or choose_split(records)
    points: dict[tuple, list[tuple[float, float, bool]]] = defaultdict(list)
    for r in records:
        m = measure(r, loss_metric, split)
        if m is not None:
            key = (r.rung, r.batch_size, r.tuned, _key(r.epochs), _key(r.lr), _key(r.warmup_epochs))
            points[key].append(m)
    candidates: dict[tuple, list[Group]] = defaultdict(list)
    for (rung, b, tuned, ep, lr, wu), ms in points.items():
        g = Group(rung, b, tuned, ep, lr, wu, seed_stats([m[0] for m in ms]), seed_stats([m[1] for m in ms]),
                  sum(m[2] for m in ms))
        candidates[(rung, b, tuned, ep)].append(g)
    best = []
    for cands in candidates.values():
        g = max(cands, key=lambda g: (_rank(g.value.mean, higher), -g.loss.mean if not math.isnan(g.loss.mean)
                                      else -math.inf, -(g.peak_lr or 0.0)))
        g.n_points = len(cands)
        best.append(g)
    return sorted(best, key=lambda g: (g.batch_size, g.rung, g.tuned, g.epochs or 0.0))


def budget(records: Iterable[TrialRecord]) -> float | None:
    """The study budget rho: the most common `epochs` value (ties: the smallest)."""
    counts = Counter(_key(r.epochs) for r in records if r.epochs is not None)
    return min(counts, key=lambda e: (-counts[e], e)) if counts else None


def _at_budget(records: Iterable[TrialRecord], rho: float | None) -> list[TrialRecord]:
    return [r for r in records if rho is None or r.epochs is None or _key(r.epochs) == rho]


def _either(*calls: bool | None) -> bool | None:
    """True if any call is True; None if all are None (unknown); else False."""
    return True if any(c is True for c in calls) else (None if all(c is None for c in calls) else False)


def _both(*calls: bool | None) -> bool | None:
    """False if any call is False; None if any is unknown; else True."""
    return False if any(c is False for c in calls) else (None if any(c is None for c in calls) else True)


@dataclass(frozen=True)
class _Rule:
    """The calls against the baseline: the metric's threshold and direction, the loss threshold (nan: none)."""

    threshold: float
    threshold_loss: float
    higher: bool

    def keeps(self, g: Group) -> tuple[bool, bool | None]:
        """(g passes both criteria, whether that call is inside the noise)."""
        value_ok = reaches(g.value.mean, self.threshold, self.higher)
        no_loss = math.isnan(self.threshold_loss) or math.isnan(g.loss.mean)
        loss_ok = no_loss or g.loss.mean <= self.threshold_loss
        value_noise = g.value.inside_noise(self.threshold)
        loss_noise = None if no_loss else g.loss.inside_noise(self.threshold_loss)
        if value_ok and loss_ok:
            return True, _either(value_noise, loss_noise)
        return False, _both(*[n for ok, n in ((value_ok, value_noise), (loss_ok, loss_noise)) if not ok])

    def reaches(self, groups: Sequence[Group]) -> tuple[bool, bool | None]:
        """(some group reaches the threshold, whether that call is inside the noise)."""
        hit = [g for g in groups if reaches(g.value.mean, self.threshold, self.higher)]
        if hit:  # sure when one reaching group's whole interval is on the good side
            return True, _both(*[g.value.inside_noise(self.threshold) for g in hit])
        return False, _either(*[g.value.inside_noise(self.threshold) for g in groups])


def _pick_baseline(groups: Sequence[Group], b0: int, rung: str | None, higher: bool) -> Group:
    """The untuned group (else the best tuned one) of `rung` (else of any rung) at b0 with the best mean."""
    at_b0 = [g for g in groups if g.batch_size == b0 and (rung is None or g.rung == rung)]
    if not at_b0:
        have = sorted({g.rung for g in groups if g.batch_size == b0})
        raise NoBaselineError(f"no completed run of rung {rung!r} at baseline batch {b0} (rungs there: {have})")
    untuned = [g for g in at_b0 if not g.tuned]
    return max(untuned or at_b0, key=lambda g: _rank(g.value.mean, higher))


def _untuned_baseline_note(groups: Sequence[Group], base: Group, b0: int, tol: float, higher: bool) -> list[str]:
    """A note when a tuned point of the baseline rung at B0 beats the untuned baseline A beyond the tolerance: the
    recipe's LR is not the best at B0, so B_L (untuned scaling from it) is measured against a weaker baseline."""
    if base.tuned:
        return []
    tuned = [g for g in groups if g.batch_size == b0 and g.rung == base.rung and g.tuned]
    best = max(tuned, key=lambda g: _rank(g.value.mean, higher), default=None)
    beyond = threshold(base.value.mean, not higher, tol)  # the mirror of the threshold, on the better side
    if best is None or _rank(best.value.mean, higher) <= _rank(beyond, higher):
        return []
    return [f"a tuned point of {base.rung} at B0={b0} (peak LR {best.peak_lr:.3g}) scores {best.value.mean:.4g}, "
            f"better than the untuned baseline A = {base.value.mean:.4g} by more than the tolerance: the recipe's LR "
            f"is not tuned for B0, so the regimes are measured against a weaker baseline (set the recipe's base LR "
            f"to the tuned one and rerun)"]


def _large_regime(groups: Sequence[Group], base: Group, b0: int, rule: _Rule
                  ) -> tuple[int, int | None, list[bool | None]]:
    """(B_L, the first failing batch, the calls up to it) along the baseline rung's own groups."""
    ladder = [g for g in groups if g.rung == base.rung and g.tuned == base.tuned and g.batch_size >= b0]
    b_l, first_fail, calls = b0, None, []
    for g in sorted(ladder, key=lambda g: g.batch_size):
        ok, noise = rule.keeps(g) if g.batch_size != b0 else (True, False)
        calls.append(noise)
        if not ok:
            first_fail = g.batch_size
            break
        b_l = g.batch_size
    return b_l, first_fail, calls


def _stopped_short_note(records: Sequence[TrialRecord], rule: _Rule, loss_metric: str, split: str) -> list[str]:
    """A note when runs that `--stop-when-decided` stopped where they reached A do not reach this threshold with
    their values at the stop: a report stricter than the study's tolerance, or a split other than the one the
    study judged (validation). Their batches' calls rest on values the runs might still have bettered."""
    short = sorted(f"{r.rung} b{r.batch_size} t{r.trial}" for r in records if r.reached_early
                   and (m := measure(r, loss_metric, split)) is not None and not reaches(m[0], rule.threshold,
                                                                                          rule.higher))
    if not short:
        return []
    return [f"{len(short)} run(s) stopped where they reached A during the study (--stop-when-decided) do not reach "
            f"this report's threshold {rule.threshold:.4g} on {split} with their values at the stop "
            f"({', '.join(short[:5])}{', ...' if len(short) > 5 else ''}): the calls of their batches may be wrong; "
            f"report with the study's --tolerance"]


def identify_regimes(records: Iterable[TrialRecord], dataset_size: int, baseline_rung: str | None = None,
                     baseline_batch: int | None = None, epochs: float | None = None,
                     tolerance: float | None = None) -> Regimes:
    """B_L, B_H, B_F and a regime per tried batch, after You et al. 2020 (definitions: module doc).

    `baseline_batch` defaults to the smallest batch with a completed run, `baseline_rung` to the
    untuned rung with the best mean metric there, `epochs` (rho) to the most common budget, `tolerance`
    to TOLERANCE of the records' direction.
    """
    records = list(records)
    metric, higher = study_metric(records)
    tol = TOLERANCE[higher] if tolerance is None else tolerance
    rho = _key(epochs) if epochs is not None else budget(records)
    used = _at_budget(records, rho)
    loss_metric, split = choose_loss_metric(used), choose_split(used)
    groups = aggregate(used, loss_metric, split)
    alive = [g for g in groups if g.n_diverged < g.value.n]  # a baseline needs a completed run
    if not alive:
        raise NoBaselineError(f"no run in {rho} epochs completed with a {metric} ({len(records)} records)")
    b0 = baseline_batch if baseline_batch is not None else min(g.batch_size for g in alive)
    base = _pick_baseline(alive, b0, baseline_rung, higher)
    loss_criterion = metric != "loss"
    rule = _Rule(threshold(base.value.mean, higher, tol), LOSS_FACTOR * base.loss.mean if loss_criterion else math.nan,
                 higher)
    notes = [f"no untuned run of {base.rung} at B0={b0}: the baseline is its best tuned point"] if base.tuned else []
    notes += _untuned_baseline_note(alive, base, b0, tol, higher)
    notes += _stopped_short_note(used, rule, loss_metric, split)
    if loss_criterion and not math.isfinite(rule.threshold_loss):
        notes.append(f"the baseline has no finite loss: B_L is decided on {metric} alone")
        rule = _Rule(rule.threshold, math.nan, higher)
    b_l, first_fail, l_calls = _large_regime(groups, base, b0, rule)
    by_batch: dict[int, list[Group]] = defaultdict(list)
    for g in groups:
        by_batch[g.batch_size].append(g)
    reach = {b: rule.reaches(gs) if b != b0 else (True, False) for b, gs in by_batch.items()}
    b_h = max(b for b, (ok, _) in reach.items() if ok and b >= b0)
    h_calls = [noise for b, (ok, noise) in reach.items() if b == b_h or b > b_h]
    rows = _rows(used, by_batch, base, (b0, b_l, b_h, dataset_size), rule, reach, split)
    if any(c is None for c in l_calls + h_calls):
        notes.append("some calls deciding B_L or B_H rest on a single seed: their noise is unknown")
    return Regimes(metric, higher, tol, b0, base.rung, base.tuned, base.value.mean, base.value.ci, base.loss.mean,
                   loss_metric, split, scaling_rule(used), loss_criterion, rho, rule.threshold,
                   rule.threshold_loss, b_l, b_h, int(dataset_size), _either(*l_calls) is True,
                   _either(*h_calls) is True, first_fail, rows, groups, notes)


def regime_of(b: int, b0: int, b_l: int, b_h: int, b_f: int) -> str:
    """The regime label of batch b given the boundaries (You et al. 2020, Sec. 3)."""
    if b >= b_f:
        return FULL
    if b < b0:
        return SMALL
    return LARGE if b <= b_l else RECOVERABLE if b <= b_h else HUGE


def _rows(records: Sequence[TrialRecord], by_batch: Mapping[int, list[Group]], base: Group,
          bounds: tuple[int, int, int, int], rule: _Rule, reach: Mapping[int, tuple[bool, bool | None]],
          split: str) -> list[BatchRow]:
    """One row per tried batch; `bounds` is (B0, B_L, B_H, B_F)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in records:
        m = measure(r, split=split)
        counts[r.batch_size]["runs"] += 1
        counts[r.batch_size]["diverged" if m and m[2] else PRUNED if r.status == PRUNED
                             else "incomplete" if m is None else "ok"] += 1
    rows = []
    for b in sorted(set(counts) | set(by_batch)):
        gs = by_batch.get(b, [])
        own = next((g for g in gs if g.rung == base.rung and g.tuned == base.tuned), None)
        keeps, k_noise = (None, None) if own is None else rule.keeps(own) if b != bounds[0] else (True, False)
        reached, r_noise = reach.get(b, (False, None))
        best = max(gs, key=lambda g: _rank(g.value.mean, rule.higher), default=None)
        c = counts[b]
        rows.append(BatchRow(b, regime_of(b, *bounds), best, own, keeps, reached, _either(k_noise, r_noise),
                             c["runs"], c["diverged"], c["incomplete"], c[PRUNED]))
    return rows


def steps_to_target(records: Iterable[TrialRecord], select: Literal["steps", "metric"] = "steps"
                    ) -> dict[tuple[str, int], float | None]:
    """Median over seeds of `steps_to_target` per (rung, batch_size) at its best tuning point.

    Shallue et al. 2019 ("Measuring the Effects of Data Parallelism") measure steps-to-result as the
    fewest steps over the metaparameter search, so `select="steps"` keeps the point with the smallest
    median; `select="metric"` keeps the best-of-tuning point by mean metric instead. The untuned
    point (the scaled LR) is one point of that search, beside the tuned ones. A seed that never reached
    counts as infinitely many steps; a median that is infinite is None (never reached).
    """
    if select not in ("steps", "metric"):
        raise ValueError(f"select must be 'steps' or 'metric', got {select!r}")
    records = list(records)
    higher, split = study_metric(records)[1], choose_split(records)
    points: dict[tuple, list[TrialRecord]] = defaultdict(list)
    for r in records:
        if r.status in ("stopped", PRUNED) and r.steps_to_target is None:
            continue  # interrupted or pruned before reaching: not known whether it would
        points[(r.rung, r.batch_size, r.tuned, _key(r.epochs), _key(r.lr), _key(r.warmup_epochs))].append(r)
    per_cell: dict[tuple[str, int], list[list[TrialRecord]]] = defaultdict(list)
    for key, recs in points.items():
        per_cell[key[:2]].append(recs)
    out: dict[tuple[str, int], float | None] = {}
    for cell, cands in sorted(per_cell.items()):
        medians = [statistics.median([math.inf if r.steps_to_target is None else float(r.steps_to_target)
                                      for r in recs]) for recs in cands]
        if select == "steps":
            best = min(medians)
        else:
            means = [seed_stats([m[0] for m in (measure(r, split=split) for r in recs) if m is not None]).mean
                     for recs in cands]
            best = medians[max(range(len(cands)), key=lambda i: _rank(means[i], higher))]
        out[cell] = None if math.isinf(best) else best
    return out


def perfect_scaling(steps0: float, b0: int, batch_sizes: Iterable[int]) -> list[float]:
    """Perfect scaling from (b0, steps0): steps(B) = steps0 * b0 / B (Shallue et al. 2019, Sec. 3)."""
    return [steps0 * b0 / b for b in batch_sizes]
