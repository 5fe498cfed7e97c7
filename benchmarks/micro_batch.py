"""Images/s of a large-batch run against the micro-batch bound (`--batch.micro-batch-limit`, default
`largebatch.batch.CPU_MICRO_BATCH` on CPU), in one run, to choose that default for a CPU.

    .venv/bin/python benchmarks/micro_batch.py                                  # 512..8192 at batch 8192, ~6 min
    .venv/bin/python benchmarks/micro_batch.py --limits 512,2048 --repeats 3 --out /tmp/mb.md

Each measurement is `largebatch train --recipe mnist-lenet-lars-8k` (LeNet-5, LARS, global batch 8192) for
`--epochs`, without evaluation, in a fresh process as a user runs it (threads `auto`, sleeping idle OpenMP threads,
freed memory kept, the precision `auto` picks); images/s is its summary's (training steps only). The bounds
alternate within each of `--repeats` rounds (the machine is shared and noisy); the table gives every figure and
the median, with the CPU flags and precision. A larger micro-batch means fewer passes (fewer kernel launches and
idle-thread wake-ups per step) but activations that fall out of the caches; where the balance lies depends on the
CPU. The gradient is the same up to float rounding whatever the bound (it is summed in other groups).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seeds import cpu_flags  # noqa: E402  (one definition of the CPU-flags line)

ROOT = Path(__file__).resolve().parents[1]


def measure(limit: int, epochs: float, recipe: str) -> tuple[float, str]:
    """(images/s, precision) of one run with micro-batch bound `limit`, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "largebatch", "train", "--recipe", recipe, "--epochs", str(epochs),
               "--eval.every-epochs", "0", "--checkpoint.every-epochs", "0", "--batch.micro-batch-limit",
               str(limit), "--output.dir", tmp, "--output.name", "run", "--output.no-progress"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"micro_batch.py: {' '.join(cmd[2:])} failed:\n{out.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        env = json.loads((Path(tmp) / "run" / "env.json").read_text())
        return float(summary["train_images_per_second"]), str(env["precision"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limits", default="512,1024,2048,4096,8192", help="micro-batch bounds to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3.0, help="training length of each run (8192 = 0.137 epochs)")
    ap.add_argument("--recipe", default="mnist-lenet-lars-8k")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    limits = [int(x) for x in args.limits.split(",") if x]
    if not limits or min(limits) < 1:
        raise SystemExit(f"--limits {args.limits!r}: give micro-batch bounds >= 1, e.g. 512,2048")
    runs: dict[int, list[float]] = {m: [] for m in limits}
    precision = "?"
    for r in range(args.repeats):
        for m in limits:
            ips, precision = measure(m, args.epochs, args.recipe)
            runs[m].append(ips)
            print(f"round {r + 1}: micro-batch bound {m}: {ips:,.0f} images/s", flush=True)
    base = statistics.median(runs[limits[0]])
    lines = [f"`{args.recipe}` for {args.epochs:g} epochs per run, images/s against the micro-batch bound; CPU: "
             f"{cpu_flags()}; precision {precision}; {args.repeats} round(s), the bounds alternating.",
             f"Command: .venv/bin/python benchmarks/micro_batch.py --limits {args.limits} --repeats {args.repeats} "
             f"--epochs {args.epochs:g}", "",
             f"| micro-batch bound | images/s (each run) | median | vs {limits[0]} |", "|---|---|---|---|"]
    for m in limits:
        med = statistics.median(runs[m])
        lines.append(f"| {m} | {' / '.join(f'{x:,.0f}' for x in runs[m])} | {med:,.0f} | {med / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
