"""The study report: trials.csv, regimes.json, report.md and PNG plots from trial records, for any metric.

    from largebatch.study.report import write_report
    write_report(records, "runs/report", dataset_size=60000)   # -> runs/report/report.md

The study's metric and direction come from the records (`TrialRecord.metric`, `higher_is_better`):
accuracy (higher is better) is shown in percent, as You et al. 2020 report it; a loss (lower is better)
as it is, with the rule of `regimes` (a batch keeps the baseline when its loss is at most (1 + 1%) A)
stated in the summary and the definitions. A plot without the data it needs is skipped, with the
reason written in report.md.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from largebatch.study.plots import (Axis, Skip, axis_of, epochs_text, plot_heatmaps, plot_ladder, plot_metric,
                                    plot_steps, plot_train_longer)
from largebatch.study.record import PRUNED, TrialRecord, study_metric, write_csv
from largebatch.study.regimes import TOLERANCE, Group, NoBaselineError, Regimes, choose_split, identify_regimes

PAPER_NOTE = ("For comparison, You et al. 2020 report for MNIST/LeNet: large-batch regime [2K, 8K], "
              "huge (8K, 60K), full 60K.")


def write_report(records: Iterable[TrialRecord], out_dir: str | Path, dataset_size: int,
                 target: float | None = None, baseline_rung: str | None = None,
                 probe: Mapping[str, Any] | None = None, tolerance: float | None = None) -> Path:
    """Write trials.csv, regimes.json, report.md and the plots into out_dir; return report.md's path.

    Regimes (B_L, B_H, B_F) are those of `identify_regimes` (You et al. 2020; `tolerance`: its relative
    tolerance, default by direction). Steps to target use the records whose `target` is `target`
    (default: the most common one). `probe` is a `largebatch probe` result (probe.json): its noise-scale
    prediction is set beside the measured B_L.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    write_csv(records, out / "trials.csv")
    try:
        reg: Regimes | None = identify_regimes(records, dataset_size, baseline_rung=baseline_rung, tolerance=tolerance)
        why = ""
    except NoBaselineError as e:
        reg, why = None, str(e)
    doc = reg.to_dict() if reg else {"error": why}
    (out / "regimes.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    axis = Axis(*study_metric(records))
    target, target_records = _target_records(records, target)
    metric = axis.metric[:1].upper() + axis.metric[1:]
    plots: list[tuple[str, Callable[[], list[str]]]] = [
        (f"{metric} vs batch size", lambda: plot_metric(reg, out / f"{axis.metric}_vs_batch.png")),
        (f"Steps to {axis.fmt(target) if target is not None else 'target'} vs batch size",
         lambda: plot_steps(target_records, reg, out / "steps_to_target.png")),
        ("LR x warmup grids", lambda: plot_heatmaps(records, reg, out)),
        ("Recipe ladder", lambda: plot_ladder(reg, out / "ladder.png")),
        ("Training longer", lambda: plot_train_longer(records, reg, out / "train_longer.png")),
    ]
    images, skipped = [], []
    for title, draw in plots:
        try:
            if reg is None:
                raise Skip(f"no regimes: {why}")
            names = draw()
            images += [(title if len(names) == 1 else f"{title}: {Path(n).stem.split('_', 1)[-1]}", n)
                       for n in names]
        except Skip as e:
            skipped.append(f"{title}: skipped, {e}")
    path = out / "report.md"
    path.write_text(_markdown(reg, why, records, images, skipped, probe))
    return path


def _target_records(records: Sequence[TrialRecord], target: float | None
                    ) -> tuple[float | None, list[TrialRecord]]:
    """The target value to report steps for, and the records measured against it."""
    if target is None:
        counts = Counter(r.target for r in records if r.target is not None)
        target = counts.most_common(1)[0][0] if counts else None
    keep = [r for r in records if r.target is None or target is None
            or math.isclose(r.target, target, rel_tol=1e-9)]
    return target, keep


def _markdown(reg: Regimes | None, why: str, records: Sequence[TrialRecord], images: Sequence[tuple[str, str]],
              skipped: Sequence[str], probe: Mapping[str, Any] | None = None) -> str:
    studies = sorted({r.study for r in records if r.study})
    pruning = any(r.status == PRUNED for r in records)  # a study run with --pruner: its table counts them
    lines = [f"# Batch-size study{': ' + ', '.join(studies) if studies else ''}", "",
             f"{len(records)} trial records. Regimes after You et al. 2020, \"The Limit of the Batch Size\"; "
             "steps to target after Shallue et al. 2019.", ""]
    if reg is None:
        lines += ["## Summary", "", f"No regimes could be identified: {why}.", *_cost(records), ""]
    else:
        lines += _summary(reg, _cost(records)) + _prediction(reg, probe) + _table(reg, pruning)
    lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in images]
    lines += [f"- {s}" for s in skipped] + ([""] if skipped else [])
    metric, higher = study_metric(records)
    if reg is None:
        reg_rule = (metric, higher, TOLERANCE[higher], metric != "loss", choose_split(records))
    else:
        reg_rule = (reg.metric, reg.higher_is_better, reg.tolerance, reg.loss_criterion, reg.split)
    lines += ["## Definitions", "", *_definitions(*reg_rule, pruning), ""]
    return "\n".join(lines)


def _paper_metric(reg: Regimes) -> bool:
    """Whether the study is decided as You et al. 2020 decide theirs: on accuracy, with the loss criterion."""
    return reg.metric == "accuracy" and reg.higher_is_better and reg.loss_criterion


def _cost(records: Sequence[TrialRecord]) -> list[str]:
    """The study's training time (its runs' wall_seconds added) and what pruning saved: each pruned run's steps to
    the end, the steps of a completed run of its batch and budget, and their seconds at the pruned run's pace."""
    total = math.fsum(r.wall_seconds for r in records)
    lines = [f"- Training time: {total / 3600:.2f} h ({total:,.0f} s), the wall-clock seconds of the "
             f"{len(records)} runs added"]
    decided = sum(r.reached_early for r in records)
    if decided:
        lines.append(f"- Stopped when decided (`study --stop-when-decided`): {decided} runs stopped at the evaluation "
                     f"where they reached the baseline's threshold; their values are those there, not at the end of "
                     f"their budget")
    pruned = [r for r in records if r.status == PRUNED]
    if not pruned:
        return lines
    full: dict[tuple[int, float | None], int] = {}
    for r in records:
        if r.status == "completed":
            key = (r.batch_size, r.epochs)
            full[key] = max(full.get(key, 0), r.steps)
    known = [(r, full[(r.batch_size, r.epochs)]) for r in pruned
             if (r.batch_size, r.epochs) in full and r.steps > 0]
    ran, budget = sum(r.steps for r, _ in known), sum(f for _, f in known)
    seconds = math.fsum(r.wall_seconds * (f / r.steps - 1) for r, f in known)
    unknown = len(pruned) - len(known)
    return lines + [f"- Pruned: {len(pruned)} of {len(records)} runs; "
                    + (f"they ran {ran:,} of their {budget:,} steps, saving {budget - ran:,} steps, about "
                       f"{seconds / 3600:.2f} h ({seconds:,.0f} s) at their own pace" if known else "")
                    + (f"{'; ' if known else ''}{unknown} without a completed run of their batch to measure the "
                       f"saving against" if unknown else "")]


def _summary(reg: Regimes, cost: Sequence[str] = ()) -> list[str]:
    def flag(uncertain: bool) -> str:
        return " (**uncertain**: a deciding call is inside the 95% CI of its seed mean)" if uncertain else ""

    axis = axis_of(reg)
    thr = axis.threshold(reg.tolerance)
    fail = f"; first failure at B={reg.b_l_first_failure}" if reg.b_l_first_failure else "; never failed"
    xi = f", xi = {reg.baseline_loss:.4g} ({reg.loss_metric})" if reg.loss_criterion else ""
    rule = [] if _paper_metric(reg) else [
        f"- Metric: {'validation' if reg.split == 'val' else 'test'} {reg.metric}, "
        f"{'higher' if reg.higher_is_better else 'lower'} is better; a batch keeps "
        f"the baseline A when its mean is {'at least' if reg.higher_is_better else 'at most'} {thr} "
        f"(a relative tolerance of {reg.tolerance:.3g})"
        + (" and its loss at most 1.2 xi" if reg.loss_criterion else "")]
    return ["## Summary", "", *rule,
            f"- Baseline: `{reg.baseline_rung}` ({'best tuned' if reg.baseline_tuned else 'untuned'}) at "
            f"B0 = {reg.baseline_batch}: A = {axis.fmt(reg.baseline_value)} {axis.pm(reg.baseline_ci)}"
            f"{xi}, rho = {epochs_text(reg.epochs)}",
            f"- Thresholds: {thr} = {axis.fmt(reg.threshold)}"
            + (f", 1.2 xi = {reg.threshold_loss:.4g}" if reg.loss_criterion else ""),
            f"- B_L = {reg.b_l} (untuned {reg.lr_scaling} LR scaling keeps A{' and xi' if reg.loss_criterion else ''}"
            f"{fail})"
            f"{flag(reg.b_l_uncertain)}",
            f"- B_H = {reg.b_h} (largest batch where some technique reaches {thr}){flag(reg.b_h_uncertain)}",
            f"- B_F = {reg.b_f} (training set size)",
            *[f"- Note: {n}" for n in reg.notes], *cost, "",
            *([PAPER_NOTE, ""] if reg.metric == "accuracy" else [])]


def _prediction(reg: Regimes, probe: Mapping[str, Any] | None) -> list[str]:
    """The noise-scale prediction made before the sweep (McCandlish et al. 2018: B_crit ~ B_simple)."""
    if not probe:
        return []
    b = probe.get("b_simple")
    if b is None or not math.isfinite(b) or b <= 0:
        return ["## Prediction", "", "The probe's noise-scale estimate was not positive and finite "
                "(still noise after its steps): no prediction.", ""]
    median = probe.get("b_simple_median")
    lines = ["## Prediction", "",
             f"- `largebatch probe` (batch {probe.get('global_batch')}, {probe.get('steps')} steps): gradient noise "
             f"scale B_simple = {b:,.0f} at its last step; McCandlish et al. 2018 predict the critical batch near it.",
             f"- Measured B_L = {reg.b_l} ({reg.b_l / b:.2g}x it), B_H = {reg.b_h} ({reg.b_h / b:.2g}x). B_simple "
             f"grows as training proceeds, so a probe over the first epochs predicts low."]
    if median is not None and math.isfinite(median) and median > 0:
        lines.append(f"- The median of the probe's per-step estimates after warmup is {median:,.0f}: B_L is "
                     f"{reg.b_l / median:.2g}x it, B_H {reg.b_h / median:.2g}x. A decaying LR drives the last "
                     f"estimates up, while a fixed budget's limit is set along the whole run.")
    return lines + [""]


def _table(reg: Regimes, pruning: bool = False) -> list[str]:
    """One row per batch; a `pruning` study's table counts its pruned runs in a column of their own."""
    axis = axis_of(reg)
    name = "acc" if reg.metric == "accuracy" else reg.metric
    lines = ["## Per batch size", "",
             f"| batch | regime | best run | mean {name} +/- 95% CI | seeds | diverged runs | incomplete | "
             + ("pruned | " if pruning else "") + "baseline keeps | inside noise |",
             "|---:|---|---|---|---:|---:|---:|" + ("---:|" if pruning else "") + "---|---|"]
    for row in reg.per_batch:
        g = row.best
        best = "-" if g is None else _describe(g)
        value = "-" if g is None else f"{axis.fmt(g.value.mean)} {axis.pm(g.value.ci)}"
        keeps = {True: "yes", False: "no", None: "not tried"}[row.keeps_baseline]
        noise = {True: "yes", False: "no", None: "unknown (1 seed)"}[row.inside_noise]
        lines.append(f"| {row.batch_size} | {row.regime} | {best} | {value} | {g.value.n if g else 0} | "
                     f"{row.n_diverged} | {row.n_incomplete} | " + (f"{row.n_pruned} | " if pruning else "")
                     + f"{keeps} | {noise} |")
    return lines + [""]


def _definitions(m: str, higher: bool, tolerance: float, loss_criterion: bool, split: str,
                 pruning: bool = False) -> list[str]:
    """The rules the summary and table follow, for metric `m` (for accuracy, You et al. 2020's)."""
    thr = Axis(m, higher).threshold(tolerance)
    if loss_criterion:
        metric = (f"- {m[:1].upper() + m[1:]} is the final test {m}; the loss criterion uses the validation loss "
                  f"when every run has one, else the test loss. Diverged and failed runs count as "
                  f"{f'{m} 0' if higher else f'infinite {m}'} and infinite loss")
    else:
        where = ("validation (every run has one; a lower-is-better metric is judged there, as You et al. 2020 "
                 "judge their loss xi)" if split == "val" else "test")
        metric = (f"- The metric is the final {where} {m}, {'higher' if higher else 'lower'} is better: a batch keeps "
                  f"the baseline A when its mean is {'at least' if higher else 'at most'} {thr} (a relative tolerance "
                  f"of {tolerance:.3g}), which stands in for the 1.2 xi loss criterion. Diverged and failed runs "
                  f"count as {f'{m} 0' if higher else f'infinite {m}'}")
    return [
        metric + "; stopped runs are incomplete and left out" + (
            ", and so are pruned runs (stopped early by the study's pruner, `--pruner`: not diverged), counted in "
            "their own column" if pruning else "") + ".",
        "- Per (rung, batch, tuned), the tuning point (peak LR, warmup) with the best mean over seeds is shown "
        f"(best-of-tuning: biased {'upwards' if higher else 'downwards'} by the search; its CI ignores the selection).",
        f"- B_L: the untuned baseline rung must keep {thr}{' and 1.2 xi' if loss_criterion else ''} at every "
        "tried batch up to B_L; the regime ends at the first failure even if a larger batch passes again.",
        f"- B_H: the largest batch at which any run (any rung, tuned or not) reaches {thr} in rho epochs.",
        "- Only runs with the study budget rho decide regimes. CIs are Student-t 95% half-widths over seeds; "
        "a call is inside the noise when the interval contains the threshold.",
        "- Steps to target: median over seeds at the tuning point with the fewest (Shallue et al. 2019); "
        "in the heatmaps a cell marked x had a diverged run (x alone: all diverged"
        + ("" if higher else f", or one did: an infinite mean {m}") + ").",
    ]


def _describe(g: Group) -> str:
    point = "" if g.peak_lr is None else f", lr {g.peak_lr:.3g}"
    point += "" if g.warmup_epochs is None else f", warmup {g.warmup_epochs:g}"
    return f"{g.rung} ({'tuned' if g.tuned else 'untuned'}{point})"


