"""The study report: trials.csv, regimes.json, report.md and PNG plots from trial records.

    from largebatch.study.report import write_report
    write_report(records, "runs/report", dataset_size=60000)   # -> runs/report/report.md

Plots follow You et al. 2020, "The Limit of the Batch Size" (Fig. 1: the recipe ladder at one large
batch; Fig. 2: accuracy over an LR x warmup grid per batch) and Shallue et al. 2019, "Measuring the
Effects of Data Parallelism on Neural Network Training" (steps to a target accuracy against batch
size, log-log, with the perfect-scaling line). A plot without the data it needs is skipped, with
the reason written in report.md. matplotlib is used through its object API on the Agg canvas
(no pyplot, so no global backend is set) and imported only when a report is written.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from largebatch.study.regimes import (FULL, HUGE, LARGE, RECOVERABLE, SMALL, Group, NoBaselineError, Record, Regimes,
                                      aggregate, identify_regimes, measure, perfect_scaling, steps_to_target)

# The trial-record schema of largebatch.study, in its documented order (the CSV's column order).
TRIAL_FIELDS = ("study", "rung", "batch_size", "seed", "tuned", "base_lr", "reference_batch", "peak_lr",
                "warmup_epochs", "epochs", "status", "test_accuracy", "val_accuracy", "val_loss", "test_loss",
                "train_loss", "steps", "steps_to_target", "target_accuracy", "wall_seconds", "run_dir")
LADDER = ("sgd", "ladder-sgd", "+warmup", "+tuning", "+label_smoothing", "+lars")  # You et al. 2020, Fig. 1 order
REGIME_COLORS = {LARGE: "#d9f0d3", RECOVERABLE: "#fee8c8", HUGE: "#f4cccc", FULL: "#d9d9d9", SMALL: "#f0f0f0"}
DPI = 120
PAPER_NOTE = ("For comparison, You et al. 2020 report for MNIST/LeNet: large-batch regime [2K, 8K], "
              "huge (8K, 60K), full 60K.")


class _Skip(Exception):
    """A plot cannot be drawn from these records; the message says why."""


def write_report(records: Iterable[Record], out_dir: str | Path, dataset_size: int,
                 target_accuracy: float | None = None, baseline_rung: str | None = None,
                 probe: Mapping[str, Any] | None = None) -> Path:
    """Write trials.csv, regimes.json, report.md and the plots into out_dir; return report.md's path.

    Regimes (B_L, B_H, B_F) are those of `identify_regimes` (You et al. 2020). Steps to target use the
    records whose `target_accuracy` is `target_accuracy` (default: the most common one). `probe` is a
    `largebatch probe` result (probe.json): its noise-scale prediction is set beside the measured B_L.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [dict(r) for r in records]
    write_csv(records, out / "trials.csv")
    try:
        reg: Regimes | None = identify_regimes(records, dataset_size, baseline_rung=baseline_rung)
        why = ""
    except NoBaselineError as e:
        reg, why = None, str(e)
    doc = reg.to_dict() if reg else {"error": why}
    (out / "regimes.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    target, target_records = _target_records(records, target_accuracy)
    plots: list[tuple[str, Callable[[], list[str]]]] = [
        ("Accuracy vs batch size", lambda: _plot_accuracy(reg, out / "accuracy_vs_batch.png")),
        (f"Steps to {_pct(target) if target else 'target'} vs batch size",
         lambda: _plot_steps(target_records, reg, out / "steps_to_target.png")),
        ("LR x warmup grids", lambda: _plot_heatmaps(records, reg, out)),
        ("Recipe ladder", lambda: _plot_ladder(reg, out / "ladder.png")),
        ("Training longer", lambda: _plot_train_longer(records, reg, out / "train_longer.png")),
    ]
    images, skipped = [], []
    for title, draw in plots:
        try:
            if reg is None:
                raise _Skip(f"no regimes: {why}")
            names = draw()
            images += [(title if len(names) == 1 else f"{title}: {Path(n).stem.split('_', 1)[-1]}", n)
                       for n in names]
        except _Skip as e:
            skipped.append(f"{title}: skipped, {e}")
    path = out / "report.md"
    path.write_text(_markdown(reg, why, records, images, skipped, probe))
    return path


def write_csv(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Every record, columns in schema order, then any extra keys sorted; None is an empty cell."""
    extra = sorted({k for r in records for k in r} - set(TRIAL_FIELDS))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*TRIAL_FIELDS, *extra], restval="")
        w.writeheader()
        for r in records:
            w.writerow({k: "" if v is None else v for k, v in r.items()})


_INTS = ("batch_size", "seed", "reference_batch", "steps", "steps_to_target", "trial")
_FLOATS = ("base_lr", "peak_lr", "warmup_epochs", "epochs", "test_accuracy", "val_accuracy", "val_loss", "test_loss",
           "train_loss", "target_accuracy", "wall_seconds", "lr_multiplier")
_BOOLS = ("tuned",)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The records of a trials.csv that `write_csv` wrote, typed as the schema says (an empty number or
    flag is None, an empty text "").

    A missing file, a missing schema column or a value of the wrong type is a one-line ConfigError.
    """
    from largebatch.config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the trials.csv that `largebatch report` wrote")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        missing = [k for k in TRIAL_FIELDS if k not in (rows[0] if rows else {})]
    if missing:
        raise ConfigError(f"{path}: not a trials.csv of `largebatch report` (no column {', '.join(missing)})")
    casts: dict[str, Callable[[str], Any]] = {**{k: int for k in _INTS}, **{k: float for k in _FLOATS},
                                              **{k: {"True": True, "False": False}.__getitem__ for k in _BOOLS}}
    out = []
    for line, row in enumerate(rows, start=2):
        record = {}
        for k, v in row.items():
            try:
                record[k] = (None if k in casts else "") if v == "" else casts.get(k, str)(v)
            except (ValueError, KeyError):
                raise ConfigError(f"{path}:{line}: column {k} has {v!r}, which is not a valid "
                                  f"{casts[k].__name__ if k not in _BOOLS else 'True/False'}") from None
        out.append(record)
    return out


def _target_records(records: Sequence[Record], target: float | None) -> tuple[float | None, list[Record]]:
    """The target accuracy to report steps for, and the records measured against it."""
    if target is None:
        counts = Counter(r["target_accuracy"] for r in records if r.get("target_accuracy") is not None)
        target = counts.most_common(1)[0][0] if counts else None
    keep = [r for r in records if r.get("target_accuracy") is None or target is None
            or math.isclose(r["target_accuracy"], target, rel_tol=1e-9)]
    return target, keep


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
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


def accuracy_bars(groups: Sequence[Group], floor: float) -> tuple[list[float], list[list[float]]]:
    """Plotted accuracy (%) per group, raised to `floor`, and its 95% CI as [below, above] lengths cut
    to [floor, 100]: a seed that diverged makes the CI of a mean span far outside 0-100%. A point
    below the floor gets no bar (its marker says it is below)."""
    y, below, above = [], [], []
    for g in groups:
        mean, ci = 100 * g.accuracy.mean, 100 * (g.accuracy.ci or 0.0)
        shown = max(mean, floor)
        y.append(shown)
        below.append(0.0 if mean < floor else shown - max(mean - ci, floor))
        above.append(0.0 if mean < floor else min(mean + ci, 100.0) - shown)
    return y, [below, above]


def _plot_accuracy(reg: Regimes, path: Path) -> list[str]:
    """Mean test accuracy (95% CI over seeds) per rung, best tuned point and untuned, on log2 batch."""
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    _shade(ax, reg)
    floor = max(0.0, 100 * reg.threshold_accuracy - 10)  # diverged means (0) would flatten the rest
    for i, rung in enumerate(sorted({g.rung for g in reg.groups})):
        for tuned in (False, True):
            gs = sorted((g for g in reg.groups if g.rung == rung and g.tuned == tuned), key=lambda g: g.batch_size)
            if not gs:
                continue
            x = [g.batch_size for g in gs]
            y, err = accuracy_bars(gs, floor)
            ax.errorbar(x, y, yerr=err, fmt="-o" if tuned else "--s", color=f"C{i}", ms=4, capsize=3,
                        label=f"{rung} ({'best tuned' if tuned else 'untuned'})")
            low = [(b, v) for b, v, g in zip(x, y, gs) if 100 * g.accuracy.mean < floor]
            if low:
                ax.plot(*zip(*low), "v", color=f"C{i}", ms=7)
    ax.axhline(100 * reg.threshold_accuracy, color="k", ls=":", lw=1, label="0.995 A")
    ax.set_xscale("log", base=2)
    ax.set_ylim(floor - 0.5, 100.25)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{_epochs(reg.epochs)}: B_L={reg.b_l}, B_H={reg.b_h}, B_F={reg.b_f}  (v: below axis)", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save(fig, path)


def _plot_steps(records: Sequence[Record], reg: Regimes, path: Path) -> list[str]:
    """Steps to target vs batch, log-log, per rung, with perfect scaling (Shallue et al. 2019)."""
    steps = {k: v for k, v in steps_to_target(records).items() if v is not None}
    if not steps:
        raise _Skip("no record has a steps_to_target (the target was never reached or not set)")
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


def _plot_heatmaps(records: Sequence[Record], reg: Regimes, out: Path) -> list[str]:
    """Per rung, one PNG with a subplot per batch: mean accuracy over (LR, warmup) cells (You et al. Fig. 2)."""
    tuned = [r for r in records if r.get("tuned") and _same_epochs(r, reg.epochs) and _lr(r) is not None]
    if not tuned:
        raise _Skip("no tuned records with an LR in the study budget")
    names = []
    for rung in sorted({str(r["rung"]) for r in tuned}):
        recs = [r for r in tuned if r["rung"] == rung]
        batches = sorted({int(r["batch_size"]) for r in recs})
        grids = [_grid([r for r in recs if int(r["batch_size"]) == b]) for b in batches]
        shown = [100 * m for g in grids for m in g[0].compressed()]
        scale = (min(shown), max(shown)) if shown else (0.0, 100.0)  # one colour scale for every batch
        cols = min(4, len(batches))
        rows = math.ceil(len(batches) / cols)
        fig = _figure(3.2 * cols + 0.8, 2.7 * rows)
        axes = [fig.add_subplot(rows, cols, k + 1) for k in range(len(batches))]
        for ax, b, grid in zip(axes, batches, grids):
            image = _heatmap(ax, b, *grid, scale)
        fig.suptitle(f"{rung}: test accuracy (%) over peak LR x warmup epochs; x = diverged run(s)", fontsize=9)
        fig.tight_layout()
        fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
        fig.savefig(out / f"heatmap_{_slug(rung)}.png", dpi=DPI)
        names.append(f"heatmap_{_slug(rung)}.png")
    return names


def _grid(recs: Sequence[Record]) -> tuple[Any, Any, Any, list[str], list[str]]:
    """Mean accuracy per (warmup, LR) cell, masked where no run completed; run and diverged counts; labels."""
    import numpy as np

    xi, xlabels = _bins([_lr(r) for r in recs], 8, log=True)
    yi, ylabels = _bins([float(r.get("warmup_epochs") or 0.0) for r in recs], 6, log=False)
    total, n, div = (np.zeros((len(ylabels), len(xlabels))) for _ in range(3))
    for r, i, j in zip(recs, xi, yi):
        m = measure(r)
        if m is not None:
            total[j, i] += m[0]
            n[j, i] += 1
            div[j, i] += m[2]
    mean = np.ma.masked_where((n == 0) | (div == n), total / np.maximum(n, 1))
    return mean, n, div, xlabels, ylabels


def _heatmap(ax: Any, batch: int, mean: Any, n: Any, div: Any, xlabels: list[str], ylabels: list[str],
             scale: tuple[float, float]) -> Any:
    image = ax.imshow(100 * mean, origin="lower", aspect="auto", cmap="viridis", vmin=scale[0], vmax=scale[1])
    import numpy as np

    mid, masked = (scale[0] + scale[1]) / 2, np.ma.getmaskarray(mean)
    for j in range(len(ylabels)):
        for i in range(len(xlabels)):
            if not n[j, i]:
                continue
            if masked[j, i]:
                ax.text(i, j, "x", ha="center", va="center", fontsize=8, color="red")
            else:
                v = 100 * float(mean[j, i])
                ax.text(i, j, f"{v:.1f}" + (" x" if div[j, i] else ""), ha="center", va="center", fontsize=6,
                        color="black" if v > mid else "white")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=6, rotation=45)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=6)
    ax.set_title(f"B={batch}", fontsize=8)
    ax.set_xlabel("peak LR", fontsize=7)
    ax.set_ylabel("warmup epochs", fontsize=7)
    return image


def _plot_ladder(reg: Regimes, path: Path) -> list[str]:
    """Best accuracy per ladder rung at the largest batch with >= 2 of them (You et al. 2020, Fig. 1)."""
    have: dict[int, set[str]] = {}
    for g in reg.groups:
        have.setdefault(g.batch_size, set()).update({g.rung} & set(LADDER))
    cands = [b for b, rungs in have.items() if len(rungs) >= 2]
    if not cands:
        raise _Skip(f"no batch size has two or more of the ladder rungs {', '.join(LADDER)}")
    b = max(cands)
    best = [max((g for g in reg.groups if g.batch_size == b and g.rung == rung), key=lambda g: g.accuracy.mean)
            for rung in LADDER if rung in have[b]]
    fig = _figure()
    ax = fig.add_subplot()
    means = [100 * g.accuracy.mean for g in best]
    ax.bar(range(len(best)), means, yerr=accuracy_bars(best, 0.0)[1], capsize=4, color="C0")
    ax.set_xticks(range(len(best)), [g.rung for g in best], rotation=20, ha="right")
    for k, (v, g) in enumerate(zip(means, best)):
        text = "all diverged" if g.n_diverged == g.accuracy.n else f"{v:.2f}"
        ax.text(k, min(v + 100 * (g.accuracy.ci or 0.0), 100.0), text, ha="center", va="bottom", fontsize=7)
    ax.axhline(100 * reg.baseline_accuracy, color="k", lw=1, label=f"baseline A at B={reg.baseline_batch}")
    ax.axhline(100 * reg.threshold_accuracy, color="k", ls=":", lw=1, label="0.995 A")
    ax.set_ylim(bottom=max(0.0, min(means + [100 * reg.threshold_accuracy]) - 2))
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"recipe ladder at B={b}, {_epochs(reg.epochs)}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _plot_train_longer(records: Sequence[Record], reg: Regimes, path: Path) -> list[str]:
    """Best accuracy against the epoch budget at the largest batch tried with several budgets."""
    groups = [g for g in aggregate(records) if g.epochs is not None]
    budgets: dict[int, set[float]] = {}
    for g in groups:
        budgets.setdefault(g.batch_size, set()).add(g.epochs)
    cands = [b for b, eps in budgets.items() if len(eps) >= 2]
    if not cands:
        raise _Skip("no batch size was trained with several epoch budgets")
    b = max(cands)
    fig = _figure()
    ax = fig.add_subplot()
    for i, rung in enumerate(sorted({g.rung for g in groups if g.batch_size == b})):
        best: dict[float, Group] = {}
        for g in sorted((g for g in groups if g.batch_size == b and g.rung == rung), key=lambda g: g.accuracy.mean):
            best[g.epochs] = g  # ascending: the best of tuned / untuned at each budget is written last
        pts = sorted(best.items())
        ax.errorbar([e for e, _ in pts], [100 * g.accuracy.mean for _, g in pts],
                    yerr=[100 * (g.accuracy.ci or 0.0) for _, g in pts], fmt="-o", color=f"C{i}", ms=4, capsize=3,
                    label=rung)
    ax.axhline(100 * reg.threshold_accuracy, color="k", ls=":", lw=1, label="0.995 A")
    ax.set_xlabel("training budget (epochs)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"training longer at B={b}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _markdown(reg: Regimes | None, why: str, records: Sequence[Record], images: Sequence[tuple[str, str]],
              skipped: Sequence[str], probe: Mapping[str, Any] | None = None) -> str:
    studies = sorted({str(r["study"]) for r in records if r.get("study")})
    lines = [f"# Batch-size study{': ' + ', '.join(studies) if studies else ''}", "",
             f"{len(records)} trial records. Regimes after You et al. 2020, \"The Limit of the Batch Size\"; "
             "steps to target after Shallue et al. 2019.", ""]
    if reg is None:
        lines += ["## Summary", "", f"No regimes could be identified: {why}.", ""]
    else:
        lines += _summary(reg) + _prediction(reg, probe) + _table(reg)
    lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in images]
    lines += [f"- {s}" for s in skipped] + ([""] if skipped else [])
    lines += ["## Definitions", "", *_DEFINITIONS, ""]
    return "\n".join(lines)


def _summary(reg: Regimes) -> list[str]:
    def flag(uncertain: bool) -> str:
        return " (**uncertain**: a deciding call is inside the 95% CI of its seed mean)" if uncertain else ""

    fail = f"; first failure at B={reg.b_l_first_failure}" if reg.b_l_first_failure else "; never failed"
    return ["## Summary", "",
            f"- Baseline: `{reg.baseline_rung}` ({'best tuned' if reg.baseline_tuned else 'untuned'}) at "
            f"B0 = {reg.baseline_batch}: A = {_pct(reg.baseline_accuracy)} {_pm(reg.baseline_accuracy_ci)}, "
            f"xi = {reg.baseline_loss:.4g} ({reg.loss_metric}), rho = {_epochs(reg.epochs)}",
            f"- Thresholds: 0.995 A = {_pct(reg.threshold_accuracy)}, 1.2 xi = {reg.threshold_loss:.4g}",
            f"- B_L = {reg.b_l} (untuned linear scaling keeps A and xi{fail}){flag(reg.b_l_uncertain)}",
            f"- B_H = {reg.b_h} (largest batch where some technique reaches 0.995 A){flag(reg.b_h_uncertain)}",
            f"- B_F = {reg.b_f} (training set size)",
            *[f"- Note: {n}" for n in reg.notes], "", PAPER_NOTE, ""]


def _prediction(reg: Regimes, probe: Mapping[str, Any] | None) -> list[str]:
    """The noise-scale prediction made before the sweep (McCandlish et al. 2018: B_crit ~ B_simple)."""
    if not probe:
        return []
    b = probe.get("b_simple")
    if b is None or not math.isfinite(b) or b <= 0:
        return ["## Prediction", "", "The probe's noise-scale estimate was not positive and finite "
                "(still noise after its steps): no prediction.", ""]
    ratio = f"{reg.b_l / b:.2g}x the prediction" if reg.b_l else "no B_L"
    return ["## Prediction", "",
            f"- `largebatch probe` (batch {probe.get('global_batch')}, {probe.get('steps')} steps): gradient noise "
            f"scale B_simple = {b:,.0f}; McCandlish et al. 2018 predict the critical batch near it.",
            f"- Measured B_L = {reg.b_l} ({ratio}). B_simple grows as training proceeds, so a probe over the "
            f"first epochs predicts low.", ""]


def _table(reg: Regimes) -> list[str]:
    lines = ["## Per batch size", "",
             "| batch | regime | best run | mean acc +/- 95% CI | seeds | diverged runs | incomplete | "
             "baseline keeps | inside noise |", "|---:|---|---|---|---:|---:|---:|---|---|"]
    for row in reg.per_batch:
        g = row.best
        best = "-" if g is None else _describe(g)
        acc = "-" if g is None else f"{_pct(g.accuracy.mean)} {_pm(g.accuracy.ci)}"
        keeps = {True: "yes", False: "no", None: "not tried"}[row.keeps_baseline]
        noise = {True: "yes", False: "no", None: "unknown (1 seed)"}[row.inside_noise]
        lines.append(f"| {row.batch_size} | {row.regime} | {best} | {acc} | {g.accuracy.n if g else 0} | "
                     f"{row.n_diverged} | {row.n_incomplete} | {keeps} | {noise} |")
    return lines + [""]


_DEFINITIONS = [
    "- Accuracy is the final test accuracy; the loss criterion uses the validation loss when every run has one, "
    "else the test loss. Diverged and failed runs count as accuracy 0 and infinite loss; stopped runs are "
    "incomplete and left out.",
    "- Per (rung, batch, tuned), the tuning point (peak LR, warmup) with the best mean over seeds is shown "
    "(best-of-tuning: biased upwards by the search; its CI ignores the selection).",
    "- B_L: the untuned baseline rung must keep 0.995 A and 1.2 xi at every tried batch up to B_L; "
    "the regime ends at the first failure even if a larger batch passes again.",
    "- B_H: the largest batch at which any run (any rung, tuned or not) reaches 0.995 A in rho epochs.",
    "- Only runs with the study budget rho decide regimes. CIs are Student-t 95% half-widths over seeds; "
    "a call is inside the noise when the interval contains the threshold.",
    "- Steps to target: median over seeds at the tuning point with the fewest (Shallue et al. 2019); "
    "in the heatmaps a cell marked x had a diverged run (x alone: all diverged).",
]


def _describe(g: Group) -> str:
    point = "" if g.peak_lr is None else f", lr {g.peak_lr:.3g}"
    point += "" if g.warmup_epochs is None else f", warmup {g.warmup_epochs:g}"
    return f"{g.rung} ({'tuned' if g.tuned else 'untuned'}{point})"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pm(ci: float | None) -> str:
    return "(n<2, no CI)" if ci is None else f"+/- {100 * ci:.2f}"


def _epochs(e: float | None) -> str:
    return "budget unknown" if e is None else f"{e:g} epochs"


def _lr(r: Record) -> float | None:
    return r.get("peak_lr") if r.get("peak_lr") is not None else r.get("base_lr")


def _same_epochs(r: Record, rho: float | None) -> bool:
    return rho is None or r.get("epochs") is None or math.isclose(float(r["epochs"]), rho, rel_tol=1e-5)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "", name.replace("+", "plus_"))
