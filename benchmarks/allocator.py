"""What keeping freed memory is worth (`largebatch.malloc`): the trainer with glibc's thresholds raised vs glibc's
defaults, in one run.

    .venv/bin/python benchmarks/allocator.py                       # batch 256 and 8192, 2 rounds, ~2 minutes
    .venv/bin/python benchmarks/allocator.py --batches 256 --examples 240000 --repeats 3   # a longer run each

Each measurement is `largebatch.trainer.train()` as `benchmarks/throughput.py` runs it (LeNet-5, momentum SGD,
the precision `auto` picks, `--examples` images after 2 warm-up steps), in a fresh process: the allocator's state
is process-wide and grows with what ran before. The `default` arm replaces `keep_freed_memory` by a no-op in its
process (what the trainer did before), the `kept` arm runs the trainer as it is. The arms alternate within each
round (the machine is shared and noisy). Printed: images/s and peak memory (the summary's) of every run, the
medians and their ratio, with the CPU flags. Longer runs gain less: glibc raises its own thresholds as it sees
blocks freed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seeds import cpu_flags  # noqa: E402  (one definition of the CPU-flags line)

ARMS = ("kept", "default")


def child(arm: str, batch: int, examples: int) -> dict:
    import largebatch.build
    from throughput import largebatch_summary

    if arm == "default":
        largebatch.build.keep_freed_memory = lambda: "glibc's defaults (benchmarks/allocator.py)"
    s = largebatch_summary(batch, examples, 2)
    return {"images_per_second": s["train_images_per_second"], "peak_mib": s["peak_memory_bytes"] / 2**20}


def measure(arm: str, batch: int, examples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arm", arm, "--batches", str(batch), "--examples",
                          str(examples)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"allocator.py --arm {arm} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="256,8192")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=40960, help="images per measurement (after 2 warm-up steps)")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one measurement, in this process
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(child(args.arm, int(args.batches), args.examples)))
        return
    print(f"CPU: {cpu_flags()}; {args.examples} images a run after 2 warm-up steps; arms alternate", flush=True)
    rows = []
    for batch in map(int, args.batches.split(",")):
        runs: dict[str, list[dict]] = {a: [] for a in ARMS}
        for _ in range(args.repeats):
            for arm in ARMS:
                runs[arm].append(measure(arm, batch, args.examples))
                r = runs[arm][-1]
                print(f"batch {batch} {arm}: {r['images_per_second']:,.0f} images/s, peak {r['peak_mib']:.0f} MiB",
                      flush=True)
        med = {a: statistics.median(r["images_per_second"] for r in runs[a]) for a in ARMS}
        rows.append((batch, med["kept"], med["default"]))
    print(f"\n{'batch':>6} {'kept img/s':>11} {'default img/s':>14} {'ratio':>6}")
    for batch, kept, default in rows:
        print(f"{batch:>6} {kept:>11,.0f} {default:>14,.0f} {kept / default:>5.2f}x")


if __name__ == "__main__":
    main()
