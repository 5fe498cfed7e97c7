"""The report's PNG plots, for any metric: accuracies in percent, other metrics (a loss) as they are.

Plots follow You et al. 2020, "The Limit of the Batch Size" (Fig. 1: the recipe ladder at one large
batch; Fig. 2: the metric over an LR x warmup grid per batch) and Shallue et al. 2019, "Measuring the
Effects of Data Parallelism on Neural Network Training" (steps to a target against batch size, log-log,
with the perfect-scaling line). Each `plot_*` returns the file names it wrote or raises `Skip` with the
reason. matplotlib is used through its object API on the Agg canvas (no pyplot, so no global backend is
set) and imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from largebatch.extras import require
from largebatch.study.record import TrialRecord
from largebatch.study.regimes import (FULL, HUGE, LARGE, RECOVERABLE, SMALL, Group, Regimes, aggregate, measure,
                                      perfect_scaling, steps_to_target)

LADDER = ("sgd", "ladder-sgd", "+warmup", "+tuning", "+label_smoothing", "+lars")  # You et al. 2020, Fig. 1 order
REGIME_COLORS = {LARGE: "#d9f0d3", RECOVERABLE: "#fee8c8", HUGE: "#f4cccc", FULL: "#d9d9d9", SMALL: "#f0f0f0"}
DPI = 120


class Skip(Exception):
    """A plot cannot be drawn from these records; the message says why."""


@dataclass(frozen=True)
class Axis:
    """How the report shows a metric: one ending in "accuracy" in percent, any other as it is."""

    metric: str
    higher: bool
    split: str = "test"  # where the metric is read, as a word: "test" or "validation"

    @property
    def percent(self) -> bool:
        return self.metric.endswith("accuracy")

    @property
    def factor(self) -> float:
        """Shown units per metric unit."""
        return 100.0 if self.percent else 1.0

    def label(self, prefix: str = "") -> str:
        return f"{prefix + ' ' if prefix else ''}{self.split} {self.metric}" + (" (%)" if self.percent else "")

    def fmt(self, x: float) -> str:
        return f"{100 * x:.2f}%" if self.percent else f"{x:.4g}"

    def pm(self, ci: float | None) -> str:
        if ci is None:
            return "(n<2, no CI)"
        return f"+/- {100 * ci:.2f}" if self.percent else f"+/- {ci:.2g}"

    def threshold(self, tolerance: float) -> str:
        """The threshold's name: "0.995 A" (higher is better) or "1.01 A" (lower is better)."""
        return f"{1 - tolerance if self.higher else 1 + tolerance:g} A"


def axis_of(reg: Regimes) -> Axis:
    return Axis(reg.metric, reg.higher_is_better, "validation" if reg.split == "val" else "test")


def metric_bars(groups: Sequence[Group], lo: float, hi: float, factor: float = 100.0
                ) -> tuple[list[float], list[list[float]]]:
    """Plotted metric (x `factor`) per group, moved into [lo, hi], and its 95% CI as [below, above] lengths
    cut to [lo, hi]: a seed that diverged makes the CI of a mean span far outside 0-100%. A point outside
    [lo, hi] gets no bar (its marker says it is outside)."""
    y, below, above = [], [], []
    for g in groups:
        mean, ci = factor * g.value.mean, factor * (g.value.ci or 0.0)
        out = not lo <= mean <= hi
        shown = min(max(mean, lo), hi)
        y.append(shown)
        below.append(0.0 if out else shown - max(mean - ci, lo))
        above.append(0.0 if out else min(mean + ci, hi) - shown)
    return y, [below, above]


def _window(reg: Regimes, axis: Axis) -> tuple[float, float]:
    """The shown range of the metric plot: 10 points below the threshold up to 100% for an accuracy, the
    finite values otherwise, up to a margin above the largest for a lower-is-better metric (where a diverged
    run's infinite loss is marked)."""
    if axis.percent and axis.higher:
        return max(0.0, 100 * reg.threshold - 10), 100.0
    finite = [axis.factor * g.value.mean for g in reg.groups if math.isfinite(g.value.mean)] or [reg.threshold]
    return (min(finite), math.inf) if axis.higher else (0.0, 1.25 * max(finite))


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    require("study", "matplotlib", "the study's plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # draw on Agg; no pyplot, no global state
    return fig


def _save(fig: Any, path: Path) -> list[str]:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return [path.name]


def _shade(ax: Any, reg: Regimes) -> None:
    """Regime bands over the tried batches, split at geometric midpoints (a log2 axis)."""
    from matplotlib.patches import Patch

    bs = [row.batch_size for row in reg.per_batch]
    edges = [bs[0] / 2**0.5] + [math.sqrt(a * b) for a, b in zip(bs, bs[1:])] + [bs[-1] * 2**0.5]
    for row, lo, hi in zip(reg.per_batch, edges, edges[1:]):
        ax.axvspan(lo, hi, color=REGIME_COLORS[row.regime], lw=0, zorder=0)
    seen = dict.fromkeys(row.regime for row in reg.per_batch)
    ax.add_artist(ax.legend(handles=[Patch(color=REGIME_COLORS[k], label=k) for k in seen], loc="lower left",
                            fontsize=7, title="regime", title_fontsize=7))


def plot_metric(reg: Regimes, path: Path) -> list[str]:
    """Mean metric (95% CI over seeds) per rung, best tuned point and untuned, on log2 batch."""
    axis = axis_of(reg)
    lo, hi = _window(reg, axis)
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    _shade(ax, reg)
    for i, rung in enumerate(sorted({g.rung for g in reg.groups})):
        for tuned in (False, True):
            gs = sorted((g for g in reg.groups if g.rung == rung and g.tuned == tuned), key=lambda g: g.batch_size)
            if not gs:
                continue
            x = [g.batch_size for g in gs]
            y, err = metric_bars(gs, lo, hi, axis.factor)
            ax.errorbar(x, y, yerr=err, fmt="-o" if tuned else "--s", color=f"C{i}", ms=4, capsize=3,
                        label=f"{rung} ({'best tuned' if tuned else 'untuned'})")
            outside = [(b, v) for b, v, g in zip(x, y, gs) if not lo <= axis.factor * g.value.mean <= hi]
            if outside:
                ax.plot(*zip(*outside), "v" if axis.higher else "^", color=f"C{i}", ms=7)
    ax.axhline(axis.factor * reg.threshold, color="k", ls=":", lw=1, label=axis.threshold(reg.tolerance))
    ax.set_xscale("log", base=2)
    if axis.percent and axis.higher:
        ax.set_ylim(lo - 0.5, hi + 0.25)
    elif not axis.higher and lo >= 0 and all(v > 0 for v in (reg.threshold, hi)):
        ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(axis.label())
    ax.set_title(f"{epochs_text(reg.epochs)}: B_L={reg.b_l}, B_H={reg.b_h}, B_F={reg.b_f}  "
                 f"({'v: below' if axis.higher else '^: above'} axis)", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save(fig, path)


def plot_steps(records: Sequence[TrialRecord], reg: Regimes, path: Path) -> list[str]:
    """Steps to target vs batch, log-log, per rung, with perfect scaling (Shallue et al. 2019)."""
    steps = {k: v for k, v in steps_to_target(records).items() if v is not None}
    if not steps:
        raise Skip("no record has a steps_to_target (the target was never reached or not set)")
    fig = _figure()
    ax = fig.add_subplot()
    rungs = sorted({rung for rung, _ in steps})
    for i, rung in enumerate(rungs):
        pts = sorted((b, s) for (r, b), s in steps.items() if r == rung)
        ax.plot(*zip(*pts), "-o", color=f"C{i}", ms=4, label=rung)
    ref = reg.baseline_rung if reg.baseline_rung in rungs else rungs[0]
    b_ref, s_ref = min((b, s) for (r, b), s in steps.items() if r == ref)
    xs = sorted({b for _, b in steps if b >= b_ref})
    ax.plot(xs, perfect_scaling(s_ref, b_ref, xs), "k:", lw=1, label=f"perfect scaling from {ref} at B={b_ref}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("steps to target (median over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _bins(values: Sequence[float], max_bins: int, log: bool) -> tuple[list[int], list[str]]:
    """Each value's bin index and the bin labels: the distinct values, or max_bins even bins."""
    uniq = sorted({float(f"{v:.6g}") for v in values})
    if len(uniq) <= max_bins:
        return [uniq.index(float(f"{v:.6g}")) for v in values], [f"{u:.3g}" for u in uniq]
    log = log and uniq[0] > 0
    lo, hi = (math.log(uniq[0]), math.log(uniq[-1])) if log else (uniq[0], uniq[-1])
    width = (hi - lo) / max_bins
    idx = [min(int(((math.log(v) if log else v) - lo) / width), max_bins - 1) for v in values]
    centers = [lo + (k + 0.5) * width for k in range(max_bins)]
    return idx, [f"{math.exp(c) if log else c:.3g}" for c in centers]


def plot_heatmaps(records: Sequence[TrialRecord], reg: Regimes, out: Path) -> list[str]:
    """Per rung, one PNG with a subplot per batch: the mean metric over (LR, warmup) cells (You et al. Fig. 2)."""
    axis = axis_of(reg)
    tuned = [r for r in records if r.tuned and _same_epochs(r, reg.epochs) and r.lr is not None]
    if not tuned:
        raise Skip("no tuned records with an LR in the study budget")
    names = []
    for rung in sorted({r.rung for r in tuned}):
        recs = [r for r in tuned if r.rung == rung]
        batches = sorted({r.batch_size for r in recs})
        grids = [_grid([r for r in recs if r.batch_size == b], reg.split) for b in batches]
        shown = [axis.factor * m for g in grids for m in g[0].compressed()]
        scale = (min(shown), max(shown)) if shown else (0.0, 100.0)  # one colour scale for every batch
        cols = min(4, len(batches))
        rows = math.ceil(len(batches) / cols)
        fig = _figure(3.2 * cols + 0.8, 2.7 * rows)
        axes = [fig.add_subplot(rows, cols, k + 1) for k in range(len(batches))]
        for ax, b, grid in zip(axes, batches, grids):
            image = _heatmap(ax, b, *grid, scale, axis)
        fig.suptitle(f"{rung}: {axis.label()} over peak LR x warmup epochs; x = diverged run(s)", fontsize=9)
        fig.tight_layout()
        fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
        fig.savefig(out / f"heatmap_{_slug(rung)}.png", dpi=DPI)
        names.append(f"heatmap_{_slug(rung)}.png")
    return names


def _grid(recs: Sequence[TrialRecord], split: str) -> tuple[Any, Any, Any, list[str], list[str]]:
    """Mean metric per (warmup, LR) cell, masked where no run completed (or, for a lower-is-better metric, where
    one diverged: an infinite mean); run and diverged counts; labels."""
    import numpy as np

    xi, xlabels = _bins([r.lr for r in recs], 8, log=True)
    yi, ylabels = _bins([float(r.warmup_epochs or 0.0) for r in recs], 6, log=False)
    total, n, div = (np.zeros((len(ylabels), len(xlabels))) for _ in range(3))
    for r, i, j in zip(recs, xi, yi):
        m = measure(r, split=split)
        if m is not None:
            total[j, i] += m[0]
            n[j, i] += 1
            div[j, i] += m[2]
    mean = np.ma.masked_where((n == 0) | (div == n) | ~np.isfinite(total), total / np.maximum(n, 1))
    return mean, n, div, xlabels, ylabels


def _heatmap(ax: Any, batch: int, mean: Any, n: Any, div: Any, xlabels: list[str], ylabels: list[str],
             scale: tuple[float, float], axis: Axis) -> Any:
    image = ax.imshow(axis.factor * mean, origin="lower", aspect="auto", cmap="viridis" if axis.higher else "viridis_r",
                      vmin=scale[0], vmax=scale[1])
    import numpy as np

    mid, masked = (scale[0] + scale[1]) / 2, np.ma.getmaskarray(mean)
    for j in range(len(ylabels)):
        for i in range(len(xlabels)):
            if not n[j, i]:
                continue
            if masked[j, i]:
                ax.text(i, j, "x", ha="center", va="center", fontsize=8, color="red")
            else:
                v = axis.factor * float(mean[j, i])
                ax.text(i, j, (f"{v:.1f}" if axis.percent else f"{v:.3g}") + (" x" if div[j, i] else ""),
                        ha="center", va="center", fontsize=6, color="black" if (v > mid) == axis.higher else "white")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=6, rotation=45)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=6)
    ax.set_title(f"B={batch}", fontsize=8)
    ax.set_xlabel("peak LR", fontsize=7)
    ax.set_ylabel("warmup epochs", fontsize=7)
    return image


def plot_ladder(reg: Regimes, path: Path) -> list[str]:
    """Best metric per ladder rung at the largest batch with >= 2 of them (You et al. 2020, Fig. 1)."""
    axis = axis_of(reg)
    have: dict[int, set[str]] = {}
    for g in reg.groups:
        have.setdefault(g.batch_size, set()).update({g.rung} & set(LADDER))
    cands = [b for b, rungs in have.items() if len(rungs) >= 2]
    if not cands:
        raise Skip(f"no batch size has two or more of the ladder rungs {', '.join(LADDER)}")
    b = max(cands)
    best = [max((g for g in reg.groups if g.batch_size == b and g.rung == rung), key=lambda g: _rank(g, axis))
            for rung in LADDER if rung in have[b]]
    lo, hi = (0.0, 100.0) if axis.percent else (0.0, _window(reg, axis)[1])
    fig = _figure()
    ax = fig.add_subplot()
    means = [min(axis.factor * g.value.mean, hi) for g in best]
    ax.bar(range(len(best)), means, yerr=metric_bars(best, lo, hi, axis.factor)[1], capsize=4, color="C0")
    ax.set_xticks(range(len(best)), [g.rung for g in best], rotation=20, ha="right")
    for k, (v, g) in enumerate(zip(means, best)):
        text = "all diverged" if g.n_diverged == g.value.n else f"{v:.2f}" if axis.percent else f"{v:.3g}"
        ax.text(k, min(v + axis.factor * (g.value.ci or 0.0), hi), text, ha="center", va="bottom", fontsize=7)
    ax.axhline(axis.factor * reg.baseline_value, color="k", lw=1, label=f"baseline A at B={reg.baseline_batch}")
    ax.axhline(axis.factor * reg.threshold, color="k", ls=":", lw=1, label=axis.threshold(reg.tolerance))
    if axis.percent:
        ax.set_ylim(bottom=max(0.0, min(means + [100 * reg.threshold]) - 2))
    ax.set_ylabel(axis.label("best"))
    ax.set_title(f"recipe ladder at B={b}, {epochs_text(reg.epochs)}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right" if axis.higher else "upper right")
    return _save(fig, path)


def plot_train_longer(records: Sequence[TrialRecord], reg: Regimes, path: Path) -> list[str]:
    """Best metric against the epoch budget at the largest batch tried with several budgets."""
    axis = axis_of(reg)
    groups = [g for g in aggregate(records) if g.epochs is not None]
    budgets: dict[int, set[float]] = {}
    for g in groups:
        budgets.setdefault(g.batch_size, set()).add(g.epochs)
    cands = [b for b, eps in budgets.items() if len(eps) >= 2]
    if not cands:
        raise Skip("no batch size was trained with several epoch budgets")
    b = max(cands)
    fig = _figure()
    ax = fig.add_subplot()
    for i, rung in enumerate(sorted({g.rung for g in groups if g.batch_size == b})):
        best: dict[float, Group] = {}
        for g in sorted((g for g in groups if g.batch_size == b and g.rung == rung), key=lambda g: _rank(g, axis)):
            best[g.epochs] = g  # worst first: the best of tuned / untuned at each budget is written last
        pts = sorted(best.items())
        ax.errorbar([e for e, _ in pts], [axis.factor * g.value.mean for _, g in pts],
                    yerr=[axis.factor * (g.value.ci or 0.0) for _, g in pts], fmt="-o", color=f"C{i}", ms=4,
                    capsize=3, label=rung)
    ax.axhline(axis.factor * reg.threshold, color="k", ls=":", lw=1, label=axis.threshold(reg.tolerance))
    ax.set_xlabel("training budget (epochs)")
    ax.set_ylabel(axis.label("best"))
    ax.set_title(f"training longer at B={b}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _rank(g: Group, axis: Axis) -> float:
    """A group's mean metric as a quantity to maximise."""
    return g.value.mean if axis.higher else -g.value.mean


def epochs_text(e: float | None) -> str:
    """The budget rho as text."""
    return "budget unknown" if e is None else f"{e:g} epochs"


def _same_epochs(r: TrialRecord, rho: float | None) -> bool:
    return rho is None or r.epochs is None or math.isclose(float(r.epochs), rho, rel_tol=1e-5)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "", name.replace("+", "plus_"))
