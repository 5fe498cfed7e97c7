"""Examples/s on 1 thread, on every core, and on `--threads auto`, by batch size: where a step becomes too small
to split, the measurement behind `largebatch.threads.MIN_FLOPS_PER_THREAD`.

    .venv/bin/python benchmarks/threads_by_work.py                     # gpt-mini and LeNet-5, ~20 min on 2 cores
    .venv/bin/python benchmarks/threads_by_work.py --runs mnist-speedrun:16,64 --repeats 1 --out /tmp/t.md

Each measurement is `largebatch train --recipe R --batch.global-batch B` for a fixed number of steps (`--steps`,
then a stop request's checkpoint; no warmup or evaluation) in a fresh process as a user runs it (the CLI's sleeping
idle OpenMP threads: the caller's OMP_WAIT_POLICY, GOMP_SPINCOUNT and OMP_NUM_THREADS are dropped; freed memory
kept, the precision `auto` picks); examples/s is its summary's (training steps only). The arms are `--threads 1`,
`--threads N` (N: the physical cores this process may use, as `auto` counts them) and `--threads auto`, alternating
within each of `--repeats` rounds (the machine is shared and noisy). The table gives every figure, the medians'
ratio N / 1, what `auto` chose, and the FLOPs of the step's average matmul/convolution it chose by (env.json's
`op_flops`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seeds import cpu_flags  # noqa: E402  (one definition of the CPU-flags line)

from largebatch.threads import OPENMP_WAIT_VARIABLES, cpus_available, physical_cores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = "shakespeare-gpt:2,4,8,16,32;mnist-speedrun:16,64,256"


def measure(recipe: str, batch: int, threads: str, steps: int) -> tuple[float, dict]:
    """(examples/s, env.json) of one run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "largebatch", "train", "--recipe", recipe, "--batch.global-batch", str(batch),
               "--epochs", "1000", "--checkpoint.stop-at-step", str(steps), "--schedule.warmup-epochs", "0",
               "--eval.every-epochs", "0", "--threads", threads, "--device", "cpu",
               "--output.dir", tmp, "--output.name", "run", "--output.no-progress"]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *OPENMP_WAIT_VARIABLES)}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)  # the CLI's own wait policy
        if out.returncode != 4:  # 4: stopped at --checkpoint.stop-at-step, as asked
            raise SystemExit(f"threads_by_work.py: {' '.join(cmd[2:])} failed:\n{out.stderr[-2000:]}")
        run = Path(tmp) / "run"
        summary = json.loads((run / "summary.json").read_text())
        return summary["train_images_per_second"], json.loads((run / "env.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=RUNS, help="recipe:batch,batch;recipe:batch,... (default %(default)s)")
    ap.add_argument("--steps", type=int, default=400, help="training steps a measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args()
    cores = str(physical_cores(cpus_available()))  # as `auto` counts them
    if cores == "1":
        raise SystemExit("threads_by_work.py: this process may use one core: nothing to compare")
    arms = ("1", cores, "auto")
    runs = [(recipe, int(b)) for part in args.runs.split(";") for recipe, batches in [part.split(":")]
            for b in batches.split(",")]
    rates: dict[tuple, list[float]] = {}
    chosen: dict[tuple, dict] = {}
    for r in range(args.repeats):
        for recipe, batch in runs:
            for threads in (arms if r % 2 == 0 else arms[::-1]):
                rate, env = measure(recipe, batch, threads, args.steps)
                rates.setdefault((recipe, batch, threads), []).append(rate)
                if threads == "auto":
                    chosen[(recipe, batch)] = env
                print(f"{recipe} batch {batch} --threads {threads}: {rate:,.1f} examples/s ({env['threads']} "
                      f"threads, {env['precision']})", flush=True)
    precision = next(iter(chosen.values()))["precision"] if chosen else "?"
    lines = [f"Examples/s by --threads, {args.steps} steps a run, {args.repeats} round(s), arms alternating; CPU: "
             f"{cpu_flags()}; precision {precision}; `largebatch train` from the shell (sleeping idle threads).",
             f"Command: .venv/bin/python benchmarks/threads_by_work.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"| recipe | batch | average matmul/conv MFLOP | 1 thread | {cores} threads | {cores} / 1 | auto "
             f"(threads) |", "|---|---|---|---|---|---|---|"]
    for recipe, batch in runs:
        med = {t: statistics.median(rates[(recipe, batch, t)]) for t in arms}
        env = chosen[(recipe, batch)]
        mflop = f"{env['op_flops'] / 1e6:.1f}" if env.get("op_flops") is not None else "-"
        each = {t: " / ".join(f"{x:,.0f}" for x in rates[(recipe, batch, t)]) for t in arms}
        lines.append(f"| {recipe} | {batch} | {mflop} | {each['1']} | {each[cores]} | {med[cores] / med['1']:.2f}x "
                     f"| {each['auto']} ({env['threads']}) |")
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
