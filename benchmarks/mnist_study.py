"""The documented MNIST/LeNet batch-size study: B_L, B_H and B_F against the paper's MNIST values.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_study.py                # the CPU grid (hours; resumable)
    .venv/bin/python benchmarks/mnist_study.py --trials 8 --seeds 3 --workers 8  # the issue's full grid (GPU)

Runs `largebatch study` (LeNet on MNIST, momentum SGD and LARS, 30 epochs, batch 256 ... 60,000) into a
SQLite file under runs/, then `largebatch report` into benchmarks/results/mnist-study/ (report.md, the
plots, trials.csv, regimes.json; not the database) and appends the command and wall time to that folder's
RUN.md. A run still under 20% test accuracy after 10 epochs is given up as diverged: it cannot reach
99.5% of the baseline, and it would cost as much as a good run. Killing it loses nothing: the same
command resumes the study where it stopped (finished trials are read from the storage, an interrupted
trial resumes its run's checkpoint). The database is not committed: when it is missing (a fresh clone),
the committed trials.csv rebuilds it (`--import-trials`), so the study continues where the last report
left it; a larger --seeds runs only the missing seeds. Runs are fp32 by default (--precision), as the
committed ones are. "The Limit of the Batch Size" places MNIST/LeNet's large-batch regime at [2K, 8K],
huge at (8K, 60K), full at 60K.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = "256,1024,2048,4096,8192,16384,32768,60000"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default=BATCHES)
    ap.add_argument("--optimizers", default="sgd,lars")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--trials", type=int, default=2, help="tuned (LR, warmup) points per (optimizer, batch)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr-range", default="0.125,8", help="LR multipliers on the linearly scaled LR, LOW,HIGH")
    ap.add_argument("--target", "--target-accuracy", type=float, default=0.99,
                    help="test accuracy for steps to target (Shallue et al.)")
    ap.add_argument("--give-up-below", type=float, default=0.2,
                    help="a run under this test accuracy at --give-up-after epochs ends as diverged (0: never)")
    ap.add_argument("--give-up-after", type=float, default=10.0, help="epoch from which --give-up-below applies")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="every run's precision.dtype; the committed report's runs are fp32 (made on an AVX2 CPU, "
                         "where auto is fp32), and more seeds of its points must match them")
    ap.add_argument("--storage", default=f"sqlite:///{ROOT}/runs/mnist-study/study.db")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist-study"))
    ap.add_argument("--report-only", action="store_true", help="write the report from the storage as it is")
    args = ap.parse_args()
    study = [sys.executable, "-m", "largebatch", "study", "--recipe", "mnist-lenet", "--batch-sizes", args.batch_sizes,
             "--optimizers", args.optimizers, "--epochs", str(args.epochs), "--trials", str(args.trials),
             "--seeds", str(args.seeds), "--lr-range", args.lr_range, "--storage", args.storage,
             "--workers", str(args.workers), "--target", str(args.target),
             "--output-dir", str(ROOT / "runs" / "mnist-study"), "--set", "threads=1", "--set", "output.progress=false",
             "--set", f"precision.dtype={args.precision}",
             "--set", f"eval.give_up_worse_than={args.give_up_below}",
             "--set", f"eval.give_up_after_epochs={args.give_up_after}"]
    if (Path(args.out) / "trials.csv").is_file():  # cells the storage already holds are left as they are
        study += ["--import-trials", str(Path(args.out) / "trials.csv")]
    t0 = time.time()
    if not args.report_only:
        subprocess.run(study, cwd=ROOT, check=True)
    wall = time.time() - t0
    subprocess.run([sys.executable, "-m", "largebatch", "report", args.storage, "--name", "mnist-lenet",
                    "--out", args.out,
                    "--target", str(args.target)],
                   cwd=ROOT, check=True)
    with open(Path(args.out) / "RUN.md", "a") as f:
        f.write(f"- {time.strftime('%Y-%m-%d %H:%M')}: `{' '.join(study[1:])}` "
                f"({'report only' if args.report_only else f'{wall / 3600:.2f} h of wall time in this invocation'})\n")


if __name__ == "__main__":
    main()
