"""Seconds to evaluate a recipe's test split on 1 thread and on every core: whether evaluation should keep the
training step's thread count (`--threads auto` fitted to a small step) or get its own (`ThreadPlan.eval_threads`).

    .venv/bin/python benchmarks/eval_threads.py                                   # gpt-mini and LeNet-5, ~3 min
    .venv/bin/python benchmarks/eval_threads.py --runs mnist-speedrun:16 --repeats 3

Each measurement runs in a fresh process as the CLI does (idle OpenMP threads sleep: the caller's
OMP_WAIT_POLICY, GOMP_SPINCOUNT and OMP_NUM_THREADS are dropped; freed memory kept; the precision `auto` picks):
it builds the run with `largebatch.build.setup` (recipe, `--batch.global-batch B`, `--threads auto`) and times
`largebatch.evaluator.evaluate` over the test split at the recipe's `eval.batch_size`, once to warm up and then
`--passes` times, with torch set to the arm's thread count. The arms (1 thread, all physical cores) alternate
within each of `--repeats` rounds. The table gives the counts `auto` picked for the step and for evaluation.
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
RUNS = "shakespeare-gpt:2;mnist-speedrun:16"


def child(recipe: str, batch: int, threads: int, passes: int) -> None:
    """Print one JSON line: the seconds of each pass and what `auto` chose."""
    from largebatch.threads import quiet_openmp
    quiet_openmp()  # before torch loads, as the CLI does
    import contextlib
    import time
    from dataclasses import replace

    import torch

    from largebatch.build import setup
    from largebatch.config import OutputConfig
    from largebatch.distributed import Dist
    from largebatch.evaluator import evaluate
    from largebatch.recipes import get_recipe

    cfg = get_recipe(recipe)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
        cfg = replace(cfg, device="cpu", threads="auto", batch=replace(cfg.batch, global_batch=batch),
                      output=OutputConfig(dir=tmp, name="run", progress=False))
        s = setup(cfg, False, Dist(), torch.device("cpu"), held)
        torch.set_num_threads(threads)
        split = s.data.evals["test"]
        seconds = []
        for _ in range(passes + 1):
            t = time.perf_counter()
            evaluate(s.model, split, s.task, cfg.eval.batch_size, s.autocast)
            seconds.append(time.perf_counter() - t)
    print(json.dumps({"seconds": seconds[1:], "train_threads": s.threads.threads,
                      "eval_threads": s.threads.eval_threads, "examples": len(split),
                      "eval_batch": cfg.eval.batch_size, "precision": str(s.autocast or "fp32")}))


def measure(recipe: str, batch: int, threads: int, passes: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *OPENMP_WAIT_VARIABLES)}
    cmd = [sys.executable, __file__, "--child", recipe, str(batch), str(threads), str(passes)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"eval_threads.py: {recipe} at {batch} on {threads} threads failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        recipe, batch, threads, passes = sys.argv[2:6]
        return child(recipe, int(batch), int(threads), int(passes))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=RUNS, help="recipe:batch;recipe:batch (default %(default)s)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes over the test split a measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args()
    cores = physical_cores(cpus_available())
    if cores == 1:
        raise SystemExit("eval_threads.py: this process may use one core: nothing to compare")
    arms = (1, cores)
    runs = [(recipe, int(b)) for part in args.runs.split(";") for recipe, b in [part.split(":")]]
    got: dict[tuple, list[dict]] = {}
    for r in range(args.repeats):
        for recipe, batch in runs:
            for threads in (arms if r % 2 == 0 else arms[::-1]):
                m = measure(recipe, batch, threads, args.passes)
                got.setdefault((recipe, batch, threads), []).append(m)
                print(f"{recipe} batch {batch}, evaluation on {threads} threads: "
                      f"{' / '.join(f'{x:.2f}' for x in m['seconds'])} s", flush=True)
    first = next(iter(got.values()))[0]
    lines = [f"Seconds a pass over the test split, {args.passes} passes a measurement, {args.repeats} round(s), arms "
             f"alternating; CPU: {cpu_flags()}; precision {first['precision']}; sleeping idle threads.",
             f"Command: .venv/bin/python benchmarks/eval_threads.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"| recipe | training batch | test examples / eval batch | auto: step, evaluation threads | 1 thread s "
             f"| {cores} threads s | 1 / {cores} |", "|---|---|---|---|---|---|---|"]
    for recipe, batch in runs:
        ms = {t: got[(recipe, batch, t)] for t in arms}
        med = {t: statistics.median(x for m in ms[t] for x in m["seconds"]) for t in arms}
        m = ms[1][0]
        each = {t: " / ".join(f"{statistics.median(m['seconds']):.2f}" for m in ms[t]) for t in arms}
        lines.append(f"| {recipe} | {batch} | {m['examples']:,} / {m['eval_batch']:,} | {m['train_threads']}, "
                     f"{m['eval_threads'] or m['train_threads']} | {each[1]} | {each[cores]} | "
                     f"{med[1] / med[cores]:.2f}x |")
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
