"""Batch-size regimes from trial records: B_L, B_H, B_F (You et al. 2020), with seed noise.

You et al. 2020, "The Limit of the Batch Size" (arXiv:2006.08517), place every batch size B in a
regime relative to a baseline run at batch B0 with test accuracy A, validation loss xi and a budget
of rho epochs:

    large               B0 <= B <= B_L   the linearly scaled LR alone keeps accuracy >= 0.995*A and
                                         loss <= 1.2*xi in rho epochs
    large-with-tuning   B_L < B <= B_H   some tried technique (warmup, LR tuning, LARS, ...) still
                                         reaches 0.995*A in rho epochs
    huge                B_H < B < B_F    nothing tried reaches it
    full                B = B_F          the training set size

Choices where the definitions leave room (report.md repeats them):

* Accuracy is `test_accuracy` (the paper's metric). The loss criterion uses `val_loss` when every
  measured record has one, else `test_loss` (the loss of each record is read from that one field).
* A "diverged" or "failed" run counts as accuracy 0 and loss inf in the seed mean (and as diverged);
  a "stopped" (interrupted) run, or a completed one without an accuracy, is left out as incomplete.
* Seeds are aggregated per tuning point (rung, batch, tuned, epochs, peak_lr, warmup_epochs); per
  (rung, batch, tuned, epochs) the point with the best mean accuracy is kept ("best-of-tuning": the
  maximum over a search is biased upwards, and its confidence interval ignores that selection).
* Only records whose `epochs` equals rho decide regimes; rho is the most common budget in the records
  unless given. Records with other budgets only feed the report's train-longer plot.
* B_L ends at the first batch (in increasing order, among those the baseline rung tried untuned) that
  fails: a larger batch that passes again does not extend it (it is labelled large-with-tuning, since
  a technique, plain linear scaling, recovers it there).
* B_H is the largest batch at which anything reaches 0.995*A, not the end of a contiguous run; it uses
  the accuracy criterion only, as the definition does.
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

Record = Mapping[str, Any]

ACCURACY_FRACTION = 0.995  # You et al. 2020: a batch "keeps" the baseline at 99.5% of its accuracy
LOSS_FACTOR = 1.2  # ... and at most 1.2 times its loss
LARGE, RECOVERABLE, HUGE, FULL, SMALL = "large", "large-with-tuning", "huge", "full", "small"
DIVERGED = ("diverged", "failed")


class NoBaselineError(ValueError):
    """No record measures an accuracy in the study budget, so there is no baseline to compare with."""


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer `df` degrees of freedom (no scipy needed).

    Inverts the closed-form two-sided mass P(|T| <= t) of Abramowitz & Stegun 26.7.3 (odd df) and
    26.7.4 (even df) by bisection, to ~1e-13; t_quantile(0.975, 2) = 4.302652729911275.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_mass(hi, int(df)) < mass:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_mass(mid, int(df)) < mass else (lo, mid)
    return 0.5 * (lo + hi)


def _t_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t, Abramowitz & Stegun 26.7.3 / 26.7.4 (finite sums in cos(theta))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df == 1:
        return 2.0 * theta / math.pi
    first = 1.0 if df % 2 == 0 else math.cos(theta)
    term, total = first, first
    for k in range(2 if df % 2 == 0 else 3, df - 1, 2):  # ratios 1/2, 3/4, ... (even); 2/3, 4/5, ... (odd)
        term *= (k - 1) / k * c2
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


@dataclass(frozen=True)
class SeedStats:
    """Mean over seeds with its sample std and the 95% Student-t half-width t_{0.975,n-1}*std/sqrt(n)."""

    n: int
    mean: float
    std: float | None  # None for n < 2 or a non-finite value
    ci: float | None

    def inside_noise(self, threshold: float) -> bool | None:
        """Whether [mean - ci, mean + ci] contains the threshold; None when there is no interval."""
        if self.ci is None or math.isnan(threshold):
            return None
        return self.mean - self.ci <= threshold <= self.mean + self.ci


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Aggregate one metric over seeds (inf stays inf: a diverged seed has an infinite loss)."""
    n = len(values)
    if n == 0:
        return SeedStats(0, math.nan, None, None)
    mean = math.fsum(values) / n
    if n < 2 or not all(math.isfinite(v) for v in values):
        return SeedStats(n, mean, None, None)
    std = statistics.stdev(values)
    return SeedStats(n, mean, std, t_quantile(0.975, n - 1) * std / math.sqrt(n))


@dataclass
class Group:
    """The best tuning point of one (rung, batch_size, tuned, epochs), aggregated over its seeds."""

    rung: str
    batch_size: int
    tuned: bool
    epochs: float | None
    peak_lr: float | None
    warmup_epochs: float | None
    accuracy: SeedStats
    loss: SeedStats
    n_diverged: int
    n_points: int = 1  # tuning points the best was chosen from


@dataclass
class BatchRow:
    """One tried batch size: its regime, the best group, the baseline rung's untuned group, the calls."""

    batch_size: int
    regime: str
    best: Group | None  # highest mean accuracy over all rungs, tuned or not
    baseline: Group | None  # the baseline rung's untuned run (None if not tried here)
    keeps_baseline: bool | None  # accuracy >= 0.995*A and loss <= 1.2*xi (None: not tried)
    reaches: bool  # some group's mean accuracy >= 0.995*A
    inside_noise: bool | None  # one of this batch's calls could flip within its 95% CI
    n_runs: int
    n_diverged: int
    n_incomplete: int


@dataclass
class Regimes:
    """B_L, B_H, B_F of You et al. 2020 with the baseline they are measured against; see module doc."""

    baseline_batch: int
    baseline_rung: str
    baseline_tuned: bool
    baseline_accuracy: float  # A
    baseline_accuracy_ci: float | None
    baseline_loss: float  # xi
    loss_metric: str
    epochs: float | None  # rho
    threshold_accuracy: float  # 0.995 * A
    threshold_loss: float  # 1.2 * xi
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


def choose_loss_metric(records: Iterable[Record]) -> str:
    """'val_loss' when every completed record with an accuracy has one, else 'test_loss'."""
    done = [r for r in records if r.get("status") == "completed" and r.get("test_accuracy") is not None]
    return "val_loss" if done and all(r.get("val_loss") is not None for r in done) else "test_loss"


def measure(record: Record, loss_metric: str = "test_loss") -> tuple[float, float, bool] | None:
    """(accuracy, loss, diverged) of one record, or None when it is no measurement (see module doc)."""
    if record.get("status") in DIVERGED:
        return 0.0, math.inf, True
    acc = record.get("test_accuracy")
    if record.get("status") != "completed" or acc is None:
        return None
    if not math.isfinite(acc):
        return 0.0, math.inf, True
    loss = record.get(loss_metric)
    loss = record.get("test_loss") if loss is None else loss
    return float(acc), math.nan if loss is None else float(loss), False


def aggregate(records: Iterable[Record], loss_metric: str | None = None) -> list[Group]:
    """Best tuning point (by mean accuracy over seeds) per (rung, batch_size, tuned, epochs)."""
    records = list(records)
    loss_metric = loss_metric or choose_loss_metric(records)
    points: dict[tuple, list[tuple[float, float, bool]]] = defaultdict(list)
    for r in records:
        m = measure(r, loss_metric)
        if m is not None:
            lr = r.get("peak_lr") if r.get("peak_lr") is not None else r.get("base_lr")
            key = (str(r["rung"]), int(r["batch_size"]), bool(r.get("tuned")), _key(r.get("epochs")),
                   _key(lr), _key(r.get("warmup_epochs")))
            points[key].append(m)
    candidates: dict[tuple, list[Group]] = defaultdict(list)
    for (rung, b, tuned, ep, lr, wu), ms in points.items():
        g = Group(rung, b, tuned, ep, lr, wu, seed_stats([m[0] for m in ms]), seed_stats([m[1] for m in ms]),
                  sum(m[2] for m in ms))
        candidates[(rung, b, tuned, ep)].append(g)
    best = []
    for cands in candidates.values():
        g = max(cands, key=lambda g: (g.accuracy.mean, -g.loss.mean if not math.isnan(g.loss.mean) else -math.inf,
                                      -(g.peak_lr or 0.0)))
        g.n_points = len(cands)
        best.append(g)
    return sorted(best, key=lambda g: (g.batch_size, g.rung, g.tuned, g.epochs or 0.0))


def budget(records: Iterable[Record]) -> float | None:
    """The study budget rho: the most common `epochs` value (ties: the smallest)."""
    counts = Counter(_key(r.get("epochs")) for r in records if r.get("epochs") is not None)
    return min(counts, key=lambda e: (-counts[e], e)) if counts else None


def _at_budget(records: Iterable[Record], rho: float | None) -> list[Record]:
    return [r for r in records if rho is None or r.get("epochs") is None or _key(r.get("epochs")) == rho]


def _either(*calls: bool | None) -> bool | None:
    """True if any call is True; None if all are None (unknown); else False."""
    return True if any(c is True for c in calls) else (None if all(c is None for c in calls) else False)


def _both(*calls: bool | None) -> bool | None:
    """False if any call is False; None if any is unknown; else True."""
    return False if any(c is False for c in calls) else (None if any(c is None for c in calls) else True)


def _keeps(g: Group, thr_acc: float, thr_loss: float) -> tuple[bool, bool | None]:
    """(passes both criteria, whether that call is inside the noise)."""
    acc_ok = g.accuracy.mean >= thr_acc
    no_loss = math.isnan(thr_loss) or math.isnan(g.loss.mean)
    loss_ok = no_loss or g.loss.mean <= thr_loss
    acc_noise = g.accuracy.inside_noise(thr_acc)
    loss_noise = None if no_loss else g.loss.inside_noise(thr_loss)
    if acc_ok and loss_ok:
        return True, _either(acc_noise, loss_noise)
    return False, _both(*[n for ok, n in ((acc_ok, acc_noise), (loss_ok, loss_noise)) if not ok])


def _reaches(groups: Sequence[Group], thr_acc: float) -> tuple[bool, bool | None]:
    """(some group reaches 0.995*A, whether that call is inside the noise)."""
    hit = [g for g in groups if g.accuracy.mean >= thr_acc]
    if hit:  # sure when one reaching group's whole interval is above
        return True, _both(*[g.accuracy.inside_noise(thr_acc) for g in hit])
    return False, _either(*[g.accuracy.inside_noise(thr_acc) for g in groups])


def _pick_baseline(groups: Sequence[Group], b0: int, rung: str | None) -> Group:
    """The untuned group (else the best tuned one) of `rung` (else of any rung) at b0 with the best mean."""
    at_b0 = [g for g in groups if g.batch_size == b0 and (rung is None or g.rung == rung)]
    if not at_b0:
        have = sorted({g.rung for g in groups if g.batch_size == b0})
        raise NoBaselineError(f"no completed run of rung {rung!r} at baseline batch {b0} (rungs there: {have})")
    untuned = [g for g in at_b0 if not g.tuned]
    return max(untuned or at_b0, key=lambda g: g.accuracy.mean)


def identify_regimes(records: Iterable[Record], dataset_size: int, baseline_rung: str | None = None,
                     baseline_batch: int | None = None, epochs: float | None = None) -> Regimes:
    """B_L, B_H, B_F and a regime per tried batch, after You et al. 2020 (definitions: module doc).

    `baseline_batch` defaults to the smallest batch with a completed run, `baseline_rung` to the
    untuned rung with the best mean accuracy there, `epochs` (rho) to the most common budget.
    """
    records = list(records)
    rho = _key(epochs) if epochs is not None else budget(records)
    used = _at_budget(records, rho)
    loss_metric = choose_loss_metric(used)
    groups = aggregate(used, loss_metric)
    alive = [g for g in groups if g.n_diverged < g.accuracy.n]  # a baseline needs a completed run
    if not alive:
        raise NoBaselineError(f"no run in {rho} epochs completed with an accuracy ({len(records)} records)")
    b0 = baseline_batch if baseline_batch is not None else min(g.batch_size for g in alive)
    base = _pick_baseline(alive, b0, baseline_rung)
    thr_acc, thr_loss = ACCURACY_FRACTION * base.accuracy.mean, LOSS_FACTOR * base.loss.mean
    notes = [f"no untuned run of {base.rung} at B0={b0}: the baseline is its best tuned point"] if base.tuned else []
    if math.isnan(thr_loss) or math.isinf(thr_loss):
        notes.append("the baseline has no finite loss: B_L is decided on accuracy alone")
        thr_loss = math.nan

    ladder = [g for g in groups if g.rung == base.rung and g.tuned == base.tuned and g.batch_size >= b0]
    b_l, first_fail, l_calls = b0, None, []
    for g in sorted(ladder, key=lambda g: g.batch_size):
        ok, noise = _keeps(g, thr_acc, thr_loss) if g.batch_size != b0 else (True, False)
        l_calls.append(noise)
        if not ok:
            first_fail = g.batch_size
            break
        b_l = g.batch_size

    by_batch: dict[int, list[Group]] = defaultdict(list)
    for g in groups:
        by_batch[g.batch_size].append(g)
    reach = {b: _reaches(gs, thr_acc) if b != b0 else (True, False) for b, gs in by_batch.items()}
    b_h = max(b for b, (ok, _) in reach.items() if ok and b >= b0)
    h_calls = [noise for b, (ok, noise) in reach.items() if b == b_h or b > b_h]
    rows = _rows(used, by_batch, base, b0, b_l, b_h, dataset_size, (thr_acc, thr_loss), reach)
    if any(c is None for c in l_calls + h_calls):
        notes.append("some calls deciding B_L or B_H rest on a single seed: their noise is unknown")
    return Regimes(b0, base.rung, base.tuned, base.accuracy.mean, base.accuracy.ci, base.loss.mean, loss_metric, rho,
                   thr_acc, thr_loss, b_l, b_h, int(dataset_size), _either(*l_calls) is True,
                   _either(*h_calls) is True, first_fail, rows, groups, notes)


def regime_of(b: int, b0: int, b_l: int, b_h: int, b_f: int) -> str:
    """The regime label of batch b given the boundaries (You et al. 2020, Sec. 3)."""
    if b >= b_f:
        return FULL
    if b < b0:
        return SMALL
    return LARGE if b <= b_l else RECOVERABLE if b <= b_h else HUGE


def _rows(records: Sequence[Record], by_batch: Mapping[int, list[Group]], base: Group, b0: int, b_l: int, b_h: int,
          b_f: int, thresholds: tuple[float, float], reach: Mapping[int, tuple[bool, bool | None]]) -> list[BatchRow]:
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in records:
        m = measure(r)
        counts[int(r["batch_size"])]["runs"] += 1
        counts[int(r["batch_size"])]["diverged" if m and m[2] else "incomplete" if m is None else "ok"] += 1
    rows = []
    for b in sorted(set(counts) | set(by_batch)):
        gs = by_batch.get(b, [])
        own = next((g for g in gs if g.rung == base.rung and g.tuned == base.tuned), None)
        keeps, k_noise = (None, None) if own is None else _keeps(own, *thresholds) if b != b0 else (True, False)
        reached, r_noise = reach.get(b, (False, None))
        c = counts[b]
        rows.append(BatchRow(b, regime_of(b, b0, b_l, b_h, b_f), max(gs, key=lambda g: g.accuracy.mean, default=None),
                             own, keeps, reached, _either(k_noise, r_noise), c["runs"], c["diverged"], c["incomplete"]))
    return rows


def steps_to_target(records: Iterable[Record], select: Literal["steps", "accuracy"] = "steps"
                    ) -> dict[tuple[str, int], float | None]:
    """Median over seeds of `steps_to_target` per (rung, batch_size) at its best tuning point.

    Shallue et al. 2019 ("Measuring the Effects of Data Parallelism") measure steps-to-result as the
    fewest steps over the metaparameter search, so `select="steps"` keeps the point with the smallest
    median; `select="accuracy"` keeps the best-of-tuning point by mean accuracy instead. The untuned
    point (the scaled LR) is one point of that search, beside the tuned ones. A seed that never reached
    counts as infinitely many steps; a median that is infinite is None (never reached).
    """
    points: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        if r.get("status") == "stopped" and r.get("steps_to_target") is None:
            continue  # interrupted before reaching: not known whether it would
        lr = r.get("peak_lr") if r.get("peak_lr") is not None else r.get("base_lr")
        points[(str(r["rung"]), int(r["batch_size"]), bool(r.get("tuned")), _key(r.get("epochs")), _key(lr),
                _key(r.get("warmup_epochs")))].append(r)
    per_cell: dict[tuple[str, int], list[list[Record]]] = defaultdict(list)
    for key, recs in points.items():
        per_cell[key[:2]].append(recs)
    if select not in ("steps", "accuracy"):
        raise ValueError(f"select must be 'steps' or 'accuracy', got {select!r}")
    out: dict[tuple[str, int], float | None] = {}
    for cell, cands in sorted(per_cell.items()):
        medians = [statistics.median([math.inf if r.get("steps_to_target") is None else float(r["steps_to_target"])
                                      for r in recs]) for recs in cands]
        if select == "steps":
            best = min(medians)
        else:
            accs = [seed_stats([m[0] for m in map(measure, recs) if m is not None]).mean for recs in cands]
            best = medians[max(range(len(cands)), key=lambda i: -math.inf if math.isnan(accs[i]) else accs[i])]
        out[cell] = None if math.isinf(best) else best
    return out


def perfect_scaling(steps0: float, b0: int, batch_sizes: Iterable[int]) -> list[float]:
    """Perfect scaling from (b0, steps0): steps(B) = steps0 * b0 / B (Shallue et al. 2019, Sec. 3)."""
    return [steps0 * b0 / b for b in batch_sizes]
