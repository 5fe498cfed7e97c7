"""A pruned batch-size study against the same study run to the end: B_L, B_H and the training time side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prune_study.py          # the reduced MNIST grid, both ways (hours)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prune_study.py --workload lm   # the reduced language-model grid
    .venv/bin/python benchmarks/prune_study.py --epochs 2 --batch-sizes 64,256,1024 --set data.train_limit=2048 \\
        --set data.test_limit=1000 --root /tmp/prune-tiny --out /tmp/prune-tiny/prune-study.md   # a smoke test

Runs `largebatch study` twice, `--pruner none` and `--pruner halving --stop-when-decided` (successive halving,
Jamieson & Talwalkar 2016, inside each (optimizer, batch) cell, and runs stopped once B_L and B_H cannot change by
them, `largebatch.study.decide`; `--pruner` takes median and hyperband too, `--no-decide` leaves the pruner alone),
with what a committed study ran at a reduced set of batch sizes (`WORKLOADS`): `mnist` is the MNIST study
(benchmarks/results/mnist-study/RUN.md: LeNet, SGD and LARS, 30 epochs, the give-up rule under 20% test accuracy
from epoch 10, steps to 99%) at 256, 2048, 8192 and 32768; `lm` the language-model study (benchmarks/lm_study.py:
gpt-tiny, AdamW and LAMB with their own LRs scaled by the square root of the batch, 0.336 epochs, decided on the
validation loss) at 12, 24, 48 and 96. Both take 2 tuned points and the untuned one per cell from the same grid,
seed 0, one thread per run, 2 workers. Each arm has its own SQLite file and run directories under --root and its
`largebatch report` beside them; then the table of B_L, B_H, runs, pruned runs and the training time (the runs'
wall_seconds added: CPU-seconds, one thread each) of both, with their ratio, goes to --out. Killing it loses nothing:
the same command resumes both studies, and an arm that is finished trains nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from largebatch.study.record import PRUNED, read_csv

ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = {
    # the committed MNIST study's settings (benchmarks/results/mnist-study/RUN.md) at a reduced set of batch sizes
    "mnist": dict(title="MNIST/LeNet", recipe="mnist-lenet", batch_sizes="256,2048,8192,32768", optimizers="sgd,lars",
                  epochs=30.0, target=0.99, lr_scaling="linear",
                  sets=["eval.give_up_worse_than=0.2", "eval.give_up_after_epochs=10.0"]),
    # the committed language-model study's settings (benchmarks/lm_study.py: gpt-tiny, each optimizer's own LR, sqrt
    # scaling, 4 evaluations a run) at its batch sizes up to 96, AdamW and LAMB
    "lm": dict(title="character GPT (gpt-tiny)", recipe="shakespeare-gpt", batch_sizes="12,24,48,96",
               optimizers="adamw,lamb", epochs=0.336, target=2.2, lr_scaling="sqrt",
               sets=["model.name=gpt-tiny", "eval.every_epochs=0.084", "data.test_limit=60000",
                     "adamw:optimizer.base_lr=0.004", "lamb:optimizer.base_lr=0.025"]),
}


def _folder(pruner: str, decide: bool) -> str:
    return pruner + ("-decided" if decide else "")


def _study(args: argparse.Namespace, pruner: str, decide: bool = False) -> list[str]:
    """The `largebatch study` command of one arm (everything but --pruner and --stop-when-decided the same in both)."""
    arm = Path(args.root) / _folder(pruner, decide)
    w = WORKLOADS[args.workload]
    sets = ["threads=1", "output.progress=false", f"precision.dtype={args.precision}", *w["sets"], *args.set]
    return [sys.executable, "-m", "largebatch", "study", "--recipe", w["recipe"], "--name", w["recipe"],
            "--batch-sizes", args.batch_sizes, "--optimizers", args.optimizers, "--epochs", str(args.epochs),
            "--trials", str(args.trials), "--seeds", str(args.seeds), "--lr-range", args.lr_range,
            "--lr-scaling", w["lr_scaling"],
            "--workers", str(args.workers), "--target", str(args.target), "--pruner", pruner,
            "--storage", f"sqlite:///{arm / 'study.db'}", "--output-dir", str(arm / "runs"),
            *(["--stop-when-decided"] if decide else []), *[a for s in sets for a in ("--set", s)]]


def _arm(args: argparse.Namespace, pruner: str, decide: bool = False) -> dict:
    """Run (or resume) one arm and report it; its numbers."""
    arm = Path(args.root) / _folder(pruner, decide)
    t0 = time.time()
    if not args.report_only:
        subprocess.run(_study(args, pruner, decide), cwd=ROOT, check=True)
    wall = time.time() - t0
    subprocess.run([sys.executable, "-m", "largebatch", "report", f"sqlite:///{arm / 'study.db'}", "--name",
                    WORKLOADS[args.workload]["recipe"],
                    "--out", str(arm / "report"), "--target", str(args.target),
                    "--baseline", args.optimizers.split(",")[0]], cwd=ROOT, check=True)  # the decided arm's baseline
    regimes = json.loads((arm / "report" / "regimes.json").read_text())
    records = read_csv(arm / "report" / "trials.csv")
    return {"pruner": pruner, "decide": decide, "b_l": regimes.get("b_l"), "b_h": regimes.get("b_h"),
            "runs": len(records), "pruned": sum(r.status == PRUNED for r in records),
            "decided": sum(r.reached_early for r in records),
            "diverged": sum(r.status in ("diverged", "failed") for r in records),
            "seconds": sum(r.wall_seconds for r in records), "wall": wall, "report": arm / "report" / "report.md"}


def _table(args: argparse.Namespace, arms: list[dict]) -> str:
    base, pruned = arms
    ratio = pruned["seconds"] / base["seconds"] if base["seconds"] else float("nan")
    same = (base["b_l"], base["b_h"]) == (pruned["b_l"], pruned["b_h"])

    def row(label: str, key: str, fmt=str) -> str:
        return f"| {label} | {fmt(base[key])} | {fmt(pruned[key])} |"

    def hours(seconds: float) -> str:
        return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"
    return "\n".join([
        "# A pruned batch-size study against the same study run to the end", "",
        f"{WORKLOADS[args.workload]['title']}, batch sizes {args.batch_sizes}, {args.optimizers}, {args.epochs:g} "
        f"epochs, {args.trials} tuned points + the untuned one per cell, {args.seeds} seed(s), {args.workers} workers; "
        f"`benchmarks/prune_study.py` ({time.strftime('%Y-%m-%d %H:%M')}).", "",
        f"| | `--pruner none` | `--pruner {pruned['pruner']}{' --stop-when-decided' if pruned['decide'] else ''}` |",
        "|---|---:|---:|",
        row("B_L", "b_l"), row("B_H", "b_h"), row("runs", "runs"), row("pruned runs", "pruned"),
        row("runs stopped where they reached the baseline's threshold", "decided"),
        row("diverged or failed runs", "diverged"),
        row("training time (the runs' seconds added)", "seconds", hours),
        row("wall time of this invocation", "wall", hours),
        f"| training time, pruned / unpruned | | {ratio:.3f} |", "",
        f"B_L and B_H {'are the same' if same else '**differ**'} both ways; the pruned study took {ratio:.1%} of the "
        f"training time. Reports: `{base['report']}`, `{pruned['report']}`.", "",
        "Commands:", "", *[f"- `{' '.join(_study(args, a['pruner'], a['decide'])[1:])}`" for a in arms], ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="mnist",
                    help="the study to reduce: its recipe, settings and default grid (WORKLOADS)")
    ap.add_argument("--batch-sizes", default=None, help="default: the workload's")
    ap.add_argument("--optimizers", default=None, help="default: the workload's")
    ap.add_argument("--epochs", type=float, default=None, help="default: the workload's")
    ap.add_argument("--trials", type=int, default=2, help="tuned (LR, warmup) points per (optimizer, batch)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr-range", default="0.125,8")
    ap.add_argument("--target", type=float, default=None,
                    help="a value of the metric for steps to target (default: the workload's)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--pruner", default="halving", choices=["median", "halving", "hyperband"])
    ap.add_argument("--no-decide", dest="decide", action="store_false",
                    help="the pruned arm without --stop-when-decided (the pruner and the give-up rule alone)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="more RunConfig overrides")
    ap.add_argument("--root", default=None, help="databases, runs and reports (default: runs/prune-study[-lm])")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune-study.md"))
    ap.add_argument("--report-only", action="store_true", help="report both storages as they are")
    args = ap.parse_args()
    args.root = args.root or str(ROOT / "runs" / ("prune-study" if args.workload == "mnist" else "prune-study-lm"))
    for key in ("batch_sizes", "optimizers", "epochs", "target"):
        if getattr(args, key) is None:
            setattr(args, key, WORKLOADS[args.workload][key])
    arms = [_arm(args, "none"), _arm(args, args.pruner, args.decide)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(_table(args, arms))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
