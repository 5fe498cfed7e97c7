"""A recipe's final metric over seeds, per precision: mean, standard deviation and 95% interval.

    .venv/bin/python benchmarks/seeds.py --recipe mnist-lenet-lars-8k --seeds 5    # precision `auto` picks here
    .venv/bin/python benchmarks/seeds.py --recipe mnist-lenet-lars-8k --seeds 5 --precision fp32,bf16 --workers 2
    .venv/bin/python benchmarks/seeds.py --recipe shakespeare-gpt --seeds 3 --split val   # a loss: val_loss

The metric is the run's task's (`summary.json`'s `metric`: accuracy in percent for classification, the loss for a
language model or regression), on --split (test by default; val where the recipe's decisions are made on it).

One seed is one machine's draw: the same recipe and seed end 0.1-0.2 points apart on CPUs whose kernels round
differently (AVX2, AVX-512, AMX) and between fp32 and bf16, so a figure worth quoting is a mean over seeds with
its interval, for the precision the machine would use. Each (precision, seed) is a `largebatch train` run in
its own process (`--workers` at a time, one thread each) under <output-dir>/<precision>-s<seed>; a finished run
is read back and an interrupted one resumed, so the script can be stopped and rerun. The table (with the CPU's
flags and torch's kernel level) is printed and written to <output-dir>/seeds.md and seeds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from largebatch.runtime import resolve_precision
from largebatch.study.plots import Axis

# two-sided 95% Student t quantiles for n - 1 degrees of freedom (n <= 11); a normal 1.96 beyond
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def cpu_flags() -> str:
    """The CPU flags that decide fp32/bf16 kernels and rounding, and torch's dispatch level."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{' '.join(shown) or 'unknown'} (torch kernels: {torch.backends.cpu.get_cpu_capability()})"


def run(recipe: str, precision: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{precision}-s{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["status"] != "stopped":
        return json.loads(summary.read_text())
    if (run_dir / "checkpoint.pt").is_file():
        cmd = ["--resume", str(run_dir)]
    else:
        cmd = ["--recipe", recipe, "--seed", str(seed), "--precision.dtype", precision, "--output-dir", str(out),
               "--output.name", run_dir.name, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / f"{run_dir.name}.log", "a") as log:
        subprocess.run([sys.executable, "-m", "largebatch", "train", *cmd, "--threads", "1", "--output.no-progress"],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not summary.is_file():
        raise SystemExit(f"{run_dir}: no summary.json; see {out / f'{run_dir.name}.log'}")
    return json.loads(summary.read_text())


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t interval half-width of per-seed values."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else math.nan
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "ci95": half, "min": min(values), "max": max(values)}


def final_value(summary: dict, split: str) -> tuple[str, float, int]:
    """(name, value, decimals) of a run's final metric on `split`, shown as the study report shows it
    (`largebatch.study.plots.Axis`: accuracy in percent, any other metric, a loss, as it is). A run that reached
    nothing counts as the worst it could be: 0% accuracy, an infinite loss."""
    axis = Axis(summary.get("metric", "accuracy"), summary.get("higher_is_better", True), split)
    value = summary.get(f"{split}_{axis.metric}")
    shown = (0.0 if axis.percent else math.inf) if value is None else axis.factor * value
    return axis.label(), shown, 2 if axis.percent else 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mnist-lenet-lars-8k")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    ap.add_argument("--precision", default="auto",
                    help="comma-separated fp32, bf16 (auto: the one `--precision.dtype auto` picks on this CPU)")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--split", default="test", choices=("test", "val"), help="the split whose final metric is shown")
    ap.add_argument("--output-dir", default="runs/seeds")
    ap.add_argument("extra", nargs="*", help="further `largebatch train` overrides (after --)")
    args = ap.parse_args()
    auto = "bf16" if resolve_precision("auto", torch.device("cpu")) is not None else "fp32"
    precisions = [auto if p == "auto" else p for p in args.precision.split(",")]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for p in precisions for s in range(args.seeds)]
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run(args.recipe, *job, out, args.extra), jobs))
    rows, record = [], {"recipe": args.recipe, "cpu": cpu_flags(), "auto_precision": auto, "runs": {}}
    for p in precisions:
        summaries = [r for (q, _), r in zip(jobs, results) if q == p]
        finals = [final_value(s, args.split) for s in summaries]
        (name, _, digits), values = finals[0], [v for _, v, _ in finals]
        d = describe(values)
        record["runs"][p] = {"metric": name, "values": values, "status": [s["status"] for s in summaries], **d}
        per_seed = " / ".join(f"{v:.{digits}f}" for v in values)
        rows.append(f"| {p}{' (auto)' if p == auto else ''} | {d['n']} | {d['mean']:.{digits}f} ± "
                    f"{d['ci95']:.{digits}f} | {d['sd']:.{digits}f} | {per_seed} |")
    table = "\n".join([f"{args.recipe}, final {name} over seeds 0-{args.seeds - 1}; CPU: {record['cpu']}",
                       "", "| precision | seeds | mean ± 95% CI | sd | per seed |", "|---|---|---|---|---|", *rows])
    print(table)
    (out / "seeds.md").write_text(table + "\n")
    (out / "seeds.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
