"""The documented language-model batch-size study: where AdamW, LAMB and LARS stop keeping a GPT's loss.

    .venv/bin/python benchmarks/lm_study.py                  # the CPU study (about 1 h on 2 cores; resumable)
    .venv/bin/python benchmarks/lm_study.py --report-only    # the report from the storage as it is

Character-level Shakespeare (`shakespeare-gpt`, the complete works, whole plays held out) with the recipe's model
shrunk to `gpt-tiny` (208K parameters) so that the grid fits a CPU budget: every run sees the recipe's 0.336
epochs (1.54M characters, nanoGPT's baby-GPT budget), so a batch 2x larger takes 2x fewer steps ("perfect step
scaling" keeps the loss). The untuned point scales the LR with the square root of the batch (`--lr-scaling sqrt`,
the usual rule for Adam-family optimizers); each (optimizer, batch) also tries the LR x 1/2 and x 2. Steps:

1. `largebatch probe` at the baseline batch: the gradient noise scale B_simple (McCandlish et al. 2018).
2. `largebatch study` over BATCHES with AdamW and LAMB (each one's LR through `--set adamw:...`, `lamb:...`),
   then LARS at fewer batches (LARS's LR and the recipe's matrices-only masks through `--set lars:...`), then
   `--cells`: more LR points or seeds where the grid's edge or seed noise decides a call.
3. `largebatch report` with the probe and a steps-to-target loss, into benchmarks/results/lm-study/ (report.md,
   plots, trials.csv, regimes.json; not the database), and the commands with their wall time into its RUN.md.

Killing it loses nothing: the same command resumes (finished trials are read from the storage). Without the
database (a fresh clone) the committed trials.csv rebuilds it (`--import-trials`). Runs are fp32, 1 thread each,
2 at a time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_BATCH = 12  # the study's baseline (the recipe's own batch is 2: its 16x LAMB claim needs it)
BATCHES = ",".join(str(BASELINE_BATCH << k) for k in range(6))  # 12 ... 384
LARS_BATCHES = ",".join(str(BASELINE_BATCH << k) for k in (0, 2, 4))  # 12, 48, 192
COMMON = ["--set", "model.name=gpt-tiny", "--set", "threads=1", "--set", "output.progress=false",
          "--set", "precision.dtype=fp32", "--set", "eval.every_epochs=0.084", "--set", "data.test_limit=60000"]
# AdamW's LR at the baseline batch, for gpt-tiny: nanoGPT's 1e-3 (for gpt-mini at batch 12) is too low for the
# smaller model (a pilot, pilot-adamw-base-lr-1e-3.csv: 5e-4 / 1e-3 / 2e-3 -> validation 2.269 / 2.116 / 1.982)
ADAMW = ["--set", "adamw:optimizer.base_lr=0.004"]
LAMB = ["--set", "lamb:optimizer.base_lr=0.025"]  # LAMB's step is lr x ||w||: 0.1 at batch 192, sqrt-scaled
# LARS adapts every tensor: with the recipe's matrices-only trust ratio the embeddings and LayerNorms take plain
# SGD steps at LARS's LR and diverge (a pilot, pilot-lars-adapt-matrices.csv: 7 of 9 runs diverged, LR 0.5-8)
LARS = ["--set", "lars:optimizer.base_lr=1.0", "--set", "lars:optimizer.reference_batch=12",
        "--set", "lars:optimizer.weight_decay_on=matrices", "--set", "lars:optimizer.adapt_on=all"]


def _run(cmd: list[str], log: Path, what: str) -> None:
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with log.open("a") as f:
        f.write(f"- {time.strftime('%Y-%m-%d %H:%M')}: `{' '.join(cmd[1:])}` ({what}, "
                f"{(time.time() - t0) / 3600:.2f} h of wall time)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=0.336)
    ap.add_argument("--trials", type=int, default=2, help="tuned LR points per (optimizer, batch)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--target", type=float, default=2.2, help="validation loss for steps to target (Shallue et al.)")
    ap.add_argument("--storage", default=f"sqlite:///{ROOT}/runs/lm-study/study.db")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm-study"))
    ap.add_argument("--report-only", action="store_true", help="write the report from the storage as it is")
    ap.add_argument("--cells", action="append", default=[], metavar="RUNGS:BATCHES:TRIALS:SEEDS",
                    help="after the grid, more tuning points or seeds for some cells, e.g. adamw:12,24,48:4:1 (LR "
                         "x1/4 and x4 too) or lamb:24,48:2:3 (seeds 1 and 2 of every finished point)")
    args = ap.parse_args()
    out, runs = Path(args.out), ROOT / "runs" / "lm-study"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "RUN.md"
    lm = [sys.executable, "-m", "largebatch"]
    probe = runs / "probe-gpt-tiny" / "probe.json"
    if not args.report_only and not probe.is_file():
        _run(lm + ["probe", "--recipe", "shakespeare-gpt", "--epochs", str(args.epochs), "--accum", "4",
                   "--output-dir", str(runs), "--name", "probe-gpt-tiny", "--set", "model.name=gpt-tiny",
                   "--set", f"batch.global_batch={BASELINE_BATCH}", "--set", "optimizer.base_lr=0.001",  # nanoGPT's
                   "--set", "threads=2",
                   "--set", "output.progress=false"], log, "probe")
    def study(trials: int | str, seeds: int | str) -> list[str]:
        return lm + ["study", "--recipe", "shakespeare-gpt", "--epochs", str(args.epochs), "--trials", str(trials),
                     "--seeds", str(seeds), "--lr-scaling", "sqrt", "--storage", args.storage, "--name", "lm-study",
                     "--workers", str(args.workers), "--target", str(args.target), "--output-dir", str(runs), *COMMON,
                     *(["--import-trials", str(out / "trials.csv")] if (out / "trials.csv").is_file() else [])]

    if not args.report_only:
        _run(study(args.trials, args.seeds) + ["--batch-sizes", BATCHES, "--optimizers", "adamw,lamb", *ADAMW,
                                               *LAMB], log, "study")
        _run(study(args.trials, args.seeds) + ["--batch-sizes", LARS_BATCHES, "--optimizers", "lars", *LARS],
             log, "study")
        for cell in args.cells:
            rungs, batches, trials, seeds = cell.split(":")
            scoped = [x for rung, flags in (("adamw", ADAMW), ("lamb", LAMB), ("lars", LARS))
                      if rung in rungs.split(",") for x in flags]
            _run(study(trials, seeds) + ["--batch-sizes", batches, "--optimizers", rungs, *scoped], log, "study")
    _run(lm + ["report", args.storage, "--name", "lm-study", "--out", str(out), "--target", str(args.target),
               "--baseline", "adamw"] + (["--probe", str(probe)] if probe.is_file() else []), log, "report")


if __name__ == "__main__":
    main()
