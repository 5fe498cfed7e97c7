"""Time `optimizer.step()` on ResNet-50's parameter set: our LARS vs torch SGD-foreach, our LAMB vs torch
AdamW-foreach, and timm's Lars / Lamb (foreach=True, no gradient clipping) for reference.

    .venv/bin/python benchmarks/optimizer_step.py                       # CPU, 7 repeats
    .venv/bin/python benchmarks/optimizer_step.py --device cuda --repeats 21

Setup: torchvision `resnet50()` parameters (161 tensors, 25.6M elements), one param group holding every
tensor (all decayed, all adapted: the most work for LARS/LAMB), random gradients set once and shared by all
candidates (no candidate writes p.grad), each candidate with its own copy of the weights. Candidates are
interleaved, each repeat times `--steps` consecutive steps per candidate after `--warmup` untimed steps, and
the table reports the median ms per step over the repeats (the min as well: the machine may be noisy).
Targets: LARS <= 1.25x SGD and LAMB <= 1.25x AdamW, both faster than timm's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from largebatch.optim import LAMB, LARS  # noqa: E402


def candidates(wd_sgd: float, wd_adam: float) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """Name -> factory over a parameter list. LR values are small so weights stay finite for many steps."""
    import timm.optim

    return {
        "torch SGD foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=wd_sgd, foreach=True),
        "LARS (ours)": lambda ps: LARS(ps, lr=1e-3, momentum=0.9, weight_decay=wd_sgd),
        "timm Lars": lambda ps: timm.optim.Lars(ps, lr=1e-3, momentum=0.9, weight_decay=wd_sgd, foreach=True,
                                                always_adapt=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=wd_adam, foreach=True),
        "LAMB (ours)": lambda ps: LAMB(ps, lr=1e-4, weight_decay=wd_adam),
        "timm Lamb": lambda ps: timm.optim.Lamb(ps, lr=1e-4, weight_decay=wd_adam, max_grad_norm=None,
                                                always_adapt=True, foreach=True),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per candidate (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="consecutive steps timed per repeat")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per candidate before timing")
    ap.add_argument("--wd-sgd", type=float, default=5e-5, help="weight decay for SGD / LARS")
    ap.add_argument("--wd-adam", type=float, default=0.01, help="weight decay for AdamW / LAMB")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--only", default="", help="comma-separated substrings: time only matching candidates")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision

    torch.manual_seed(0)
    ref = [p.detach().to(device) for p in torchvision.models.resnet50().parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in ref]
    n = sum(p.numel() for p in ref)
    print(f"resnet50: {len(ref)} tensors, {n / 1e6:.1f}M params, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")

    opts = {}
    for name, make in candidates(args.wd_sgd, args.wd_adam).items():
        if args.only and not any(s.strip().lower() in name.lower() for s in args.only.split(",")):
            continue
        params = [p.clone().requires_grad_(True) for p in ref]
        for p, g in zip(params, grads):
            p.grad = g
        opts[name] = make(params)
        for _ in range(args.warmup):
            opts[name].step()
    sync(device)

    times: dict[str, list[float]] = {k: [] for k in opts}
    names = list(opts)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every repeat
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opts[name].step()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / args.steps)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'optimizer':<22}{'median ms':>11}{'min ms':>10}"
          f"   (ms per step, {args.repeats} repeats x {args.steps} steps)")
    for k in names:
        print(f"{k:<22}{med[k]:>11.2f}{min(times[k]):>10.2f}")
    print()
    for ours, base, timm_name in (("LARS (ours)", "torch SGD foreach", "timm Lars"),
                                  ("LAMB (ours)", "torch AdamW foreach", "timm Lamb")):
        if ours in med and base in med:
            line = f"{ours.split()[0]}/{base.split()[1]}: {med[ours] / med[base]:.2f}x (target <= 1.25x)"
            if timm_name in med:
                line += f"; {timm_name}/{ours.split()[0]}: {med[timm_name] / med[ours]:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
