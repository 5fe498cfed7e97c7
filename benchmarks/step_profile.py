"""The bare LeNet training step on CPU: eager vs `torch.compile` (inductor), and where its time goes.

    .venv/bin/python benchmarks/step_profile.py                    # eager and compiled, alternating, batch 256
    .venv/bin/python benchmarks/step_profile.py --profile eager    # torch.profiler table of 10 eager steps

The step the trainer runs, without the trainer: LeNet-5 in channels_last, bf16 autocast where the CPU has fast bf16
(`largebatch.runtime.resolve_precision("auto")`), fp32 loss, foreach momentum SGD, freed memory kept
(`largebatch.malloc`), on one fixed random batch. Images/s over `--steps` steps after 5 warm-up steps (the compile
happens in the warm-up), each mode in a fresh process, alternating `--repeats` times. This isolates the kernels'
cost from the trainer's (compare `benchmarks/throughput.py`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seeds import cpu_flags  # noqa: E402  (one definition of the CPU-flags line)

MODES = ("eager", "compile")


def child(mode: str, batch: int, steps: int, profile: bool) -> None:
    import torch
    import torch.nn.functional as F

    from largebatch.malloc import keep_freed_memory
    from largebatch.models import build_model
    from largebatch.runtime import resolve_precision

    keep_freed_memory()
    dtype = resolve_precision("auto", torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("lenet").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    x = torch.randn(batch, 1, 28, 28).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    forward = torch.compile(model) if mode == "compile" else model

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if profile:
        with torch.profiler.profile() as p:
            for _ in range(10):
                step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(batch * steps / (time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", choices=MODES, default=None, help="print a torch.profiler table of this mode")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or args.profile:
        child(args.child or args.profile, args.batch, args.steps, profile=args.profile is not None)
        return
    print(f"CPU: {cpu_flags()}; batch {args.batch}, {args.steps} steps a measurement", flush=True)
    ips: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--steps",
                                  str(args.steps)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"step_profile.py --child {mode} failed:\n{out.stderr[-2000:]}")
            ips[mode].append(float(out.stdout.split()[-1]))
            print(f"{mode}: {ips[mode][-1]:,.0f} images/s", flush=True)
    e, c = (sorted(ips[m])[len(ips[m]) // 2] for m in MODES)
    print(f"\nmedian eager {e:,.0f}, compiled {c:,.0f} images/s: compiled / eager {c / e:.2f}x")


if __name__ == "__main__":
    main()
