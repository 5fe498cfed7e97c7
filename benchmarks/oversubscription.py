"""Oversubscription: `largebatch train` alone vs beside a second busy training process, by --threads and by how
idle OpenMP threads wait (issue 16, part 4: `make demo` fell from 15K to 2.4K images/s beside a second trainer).

    .venv/bin/python benchmarks/oversubscription.py                    # ~5 min on 2 idle cores
    .venv/bin/python benchmarks/oversubscription.py --repeats 2 --no-torchrun

    .venv/bin/python benchmarks/oversubscription.py --recipe shakespeare-gpt --epochs 0.02 --threads 1,2 \
        --policies sleep,spin3000 --no-torchrun                    # any recipe; spinN is GOMP_SPINCOUNT=N

Every run is --recipe (default the demo's, `mnist-lenet-lars-8k`, global batch 8192; --batch to change it) for
--epochs (default 1) on --train-limit examples (default all), evaluation and checkpoints off, timed by the trainer
itself (summary.json's training-time examples/s). Arms: each --threads value (default `2` and `auto`), each with
idle OpenMP threads

- spinning: GOMP_SPINCOUNT=300000, libgomp's own default, what every run did before the CLI set a policy;
- short: GOMP_SPINCOUNT=10000, a short spin before sleeping;
- sleeping: OMP_WAIT_POLICY=PASSIVE, what `largebatch.threads.quiet_openmp` now sets when the user sets neither.

Each arm trains alone, then beside a neighbour: the same command with the same settings, 100x longer, started
first and killed once the measured run ends, so the two overlap for the whole measured run. On a machine whose
cores both processes want, a fair share is half: `beside / alone` >= 0.5 is "loses no more than its share".
With --torchrun (default) it also times one torchrun job of 2 ranks (gloo) for each --threads value and policy:
`--threads 2` puts 2 x 2 threads on the cores, `auto` gives each rank its half. Arms alternate between repeats
against drift; the table shows medians. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from seeds import cpu_flags  # noqa: E402  (one definition of the CPU-flags line)

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "short": {"GOMP_SPINCOUNT": "10000"},
            "sleep": {"OMP_WAIT_POLICY": "PASSIVE"}}
"""Named policies; `spinN` (e.g. spin3000) is GOMP_SPINCOUNT=N."""


def policy_env(policy: str) -> dict[str, str]:
    """The OpenMP wait variables of `policy`: a name of POLICIES or spinN."""
    if policy in POLICIES:
        return POLICIES[policy]
    if re.fullmatch(r"spin\d+", policy):
        return {"GOMP_SPINCOUNT": policy[4:]}
    raise SystemExit(f"unknown policy {policy!r}: use one of {list(POLICIES)} or spinN (GOMP_SPINCOUNT=N)")


THREADS = "2,auto"


def flags(args: argparse.Namespace, out: Path, name: str, threads: str, epochs: float) -> list[str]:
    sized = ["--batch.global-batch", str(args.batch)] if args.batch else []
    sized += ["--data.train-limit", str(args.train_limit)] if args.train_limit else []
    return ["--recipe", args.recipe, *sized, "--epochs", f"{epochs:g}", "--data.test-limit", "1000",
            "--schedule.warmup-epochs", f"{min(2.0, args.epochs / 2):g}",
            "--eval.every-epochs", "0", "--checkpoint.every-epochs", "0", "--threads", threads, "--device", "cpu",
            "--output-dir", str(out), "--output.name", name, "--output.no-progress"]


def environ(policy: str) -> dict[str, str]:
    """This process's environment with only `policy`'s OpenMP wait variables (and no OMP_NUM_THREADS)."""
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **policy_env(policy)}


def measured(cmd: list[str], env: dict[str, str], run_dir: Path) -> tuple[float, int]:
    """Run `cmd` to completion: (training images/s, torch threads of rank 0) from its run directory."""
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["train_images_per_second"], json.loads((run_dir / "env.json").read_text())["threads"]


def beside(cmd: list[str], neighbour: list[str], env: dict[str, str], run_dir: Path, log: Path) -> tuple[float, int]:
    """`measured(cmd)` while `neighbour` trains: it starts first, and the measurement waits for its first
    [largebatch] threads line (printed just before its first step)."""
    with open(log, "w") as f:
        p = subprocess.Popen(neighbour, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        while "[largebatch] threads" not in log.read_text():
            if p.poll() is not None:
                raise SystemExit(f"the neighbour {' '.join(neighbour)} exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        result = measured(cmd, env, run_dir)
        if p.poll() is not None:
            raise SystemExit(f"the neighbour finished before the measured run: raise its length\n"
                             f"{log.read_text()[-2000:]}")
        return result
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0, help="length of each measured run")
    ap.add_argument("--recipe", default="mnist-lenet-lars-8k", help="what trains (the demo's recipe by default)")
    ap.add_argument("--train-limit", type=int, default=0, help="training examples (0: the recipe's, all of them)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0, help="global batch (0: the recipe's; the demo's is 8192)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"idle-thread policies to time: {list(POLICIES)} or spinN")
    ap.add_argument("--threads", default=THREADS, help="--threads values to time, comma-separated")
    ap.add_argument("--torchrun", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a 2-rank torchrun job for each --threads value")
    args = ap.parse_args()

    python = [sys.executable, "-m", "largebatch", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "largebatch", "train"]
    arms = [(threads, policy) for threads in args.threads.split(",") for policy in args.policies.split(",")]
    rates: dict[tuple, list[float]] = {}
    resolved: dict[tuple, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for r in range(args.repeats):
            for threads, policy in (arms if r % 2 == 0 else arms[::-1]):  # alternate against drift
                env, key = environ(policy), f"{threads}-{policy}-{r}"
                for where in ("alone", "beside"):
                    name = f"{where}-{key}"
                    cmd = python + flags(args, out, name, threads, args.epochs)
                    if where == "alone":
                        rate, n = measured(cmd, env, out / name)
                    else:
                        neighbour = python + flags(args, out, f"neighbour-{key}", threads, 100 * args.epochs)
                        rate, n = beside(cmd, neighbour, env, out / name, out / f"neighbour-{key}.log")
                    rates.setdefault((where, threads, policy), []).append(rate)
                    resolved[(where, threads, policy)] = n
                    print(f"{where:6s} --threads {threads:4s} idle threads {policy:5s}: {rate:8,.0f} examples/s "
                          f"({n} threads)", flush=True)
                if args.torchrun:
                    name = f"torchrun-{key}"
                    rate, n = measured(torchrun + flags(args, out, name, threads, args.epochs), env, out / name)
                    rates.setdefault(("torchrun", threads, policy), []).append(rate)
                    resolved[("torchrun", threads, policy)] = n
                    print(f"2 ranks --threads {threads:4s} idle threads {policy:5s}: {rate:8,.0f} examples/s "
                          f"({n} threads per rank)", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    batch = f"global batch {args.batch}" if args.batch else "the recipe's batch"
    limit = f"{args.train_limit} examples" if args.train_limit else "all examples"
    print(f"\n{args.recipe}, {batch}, {args.epochs:g} epoch(s) of {limit}, {cores} CPUs, CPU {cpu_flags()}, "
          f"{args.repeats} repeat(s) (medians)")
    print("| --threads | idle OpenMP threads | threads | alone examples/s | beside a 2nd trainer | beside / alone |")
    print("|---|---|---|---|---|---|")
    for threads, policy in arms:
        alone, near = med[("alone", threads, policy)], med[("beside", threads, policy)]
        print(f"| {threads} | {policy} ({' '.join(f'{k}={v}' for k, v in policy_env(policy).items())}) | "
              f"{resolved[('alone', threads, policy)]} | {alone:,.0f} | {near:,.0f} | {near / alone:.2f} |")
    if args.torchrun:
        print("\n| torchrun 2 ranks, --threads | idle OpenMP threads | threads per rank | examples/s "
              "| vs 1 process alone |")
        print("|---|---|---|---|---|")
        for threads, policy in arms:
            rate = med[("torchrun", threads, policy)]
            print(f"| {threads} | {policy} | {resolved[('torchrun', threads, policy)]} | {rate:,.0f} | "
                  f"{rate / med[('alone', threads, policy)]:.2f} |")
    first, *others = args.policies.split(",")
    threads = args.threads.split(",")[0]
    for policy in others:
        print(f"\n{policy} vs {first}, --threads {threads}: alone "
              f"{med[('alone', threads, policy)] / med[('alone', threads, first)]:.3f}x, beside a 2nd trainer "
              f"{med[('beside', threads, policy)] / med[('beside', threads, first)]:.2f}x")


if __name__ == "__main__":
    main()
