"""ResNet-50 training throughput on synthetic images: the largebatch trainer vs a plain PyTorch loop, one run.

    .venv/bin/python benchmarks/resnet50_throughput.py                          # CPU: 64x64, batch 32
    python benchmarks/resnet50_throughput.py --resolution 224 --batch 256 --steps 30 [--compile]   # one GPU

Both sides train torchvision's ResNet-50 (v1.5) on synthetic images of the same shape with the same
precision (bf16 autocast on CUDA, fp32 on a CPU without fast bf16) and channels_last:
- plain: the textbook loop on one fixed, already normalised batch on the device:
  `torch.autocast` forward, fp32 loss, `backward()`, `SGD(momentum, foreach).step()`, `zero_grad()`;
- largebatch: `largebatch.trainer.train()` itself on `--data.name synthetic` (uint8 images held on the
  device, a fresh seeded batch gathered and normalised every step), LARS, the trainer's step and logging;
  its images/s is read from metrics.jsonl over the steps after the warm-up (compilation excluded).
The two alternate `--repeats` times (the machine is shared and noisy); medians and their ratio are printed.
Both run in this one process: on a CPU the trainer's first run raises glibc's malloc thresholds for the whole
process (`largebatch.malloc`), so the plain loop's later repeats get that too (in the plain loop's favour;
`benchmarks/throughput.py` measures each arm in a fresh process instead). On a GPU nothing of it applies.
Target (issue 6): >= 3,000 images/s on one H100 in bf16 at 224x224 (NVIDIA's PyTorch figure for an A100
with AMP: 2,470).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.config import (BatchConfig, CheckpointConfig, DataConfig, DiagnosticsConfig, EvalConfig,
                               ModelConfig, OptimizerConfig, OutputConfig, PrecisionConfig, RunConfig)
from largebatch.models import build_model
from largebatch.runtime import resolve_precision
from largebatch.trainer import train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(device: torch.device, resolution: int, batch: int, steps: int, warmup: int, compile: bool) -> float:
    autocast = resolve_precision("auto", device)
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=1000).to(device).to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
    x = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def largebatch_run(device: torch.device, resolution: int, batch: int, steps: int, warmup: int, compile: bool,
                   optimizer: str = "lars") -> float:
    examples = 4 * batch
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(recipe="bench", epochs=(warmup + steps) * batch / examples, device=device.type,
                        data=DataConfig(name="synthetic", image_size=resolution, synthetic_examples=examples,
                                        synthetic_classes=1000, test_limit=batch),
                        model=ModelConfig(name="resnet50", compile=compile),
                        optimizer=OptimizerConfig(name=optimizer, base_lr=0.1 if optimizer == "lars" else 0.01,
                                                  reference_batch=batch, weight_decay=1e-4),
                        batch=BatchConfig(global_batch=batch, micro_batch=batch), precision=PrecisionConfig("auto"),
                        eval=EvalConfig(every_epochs=0, batch_size=batch), checkpoint=CheckpointConfig(every_epochs=0),
                        diagnostics=DiagnosticsConfig(every_steps=10**9),
                        output=OutputConfig(dir=tmp, name="bench", progress=False, log_every=warmup))
        train(cfg)
        rates = [r["images_per_second"] for r in map(json.loads, (Path(tmp) / "bench" / "metrics.jsonl").open())
                 if "images_per_second" in r]
    return statistics.fmean(rates[1:])  # every log interval after the first (warm-up, compilation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--resolution", type=int, default=224 if cuda else 64)
    ap.add_argument("--batch", type=int, default=256 if cuda else 32)
    ap.add_argument("--steps", type=int, default=30 if cuda else 6, help="measured steps (a multiple of --warmup)")
    ap.add_argument("--warmup", type=int, default=10 if cuda else 3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--optimizer", default="lars", help="the trainer's optimizer (the plain loop always uses SGD)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = resolve_precision("auto", device) or torch.float32
    print(f"ResNet-50 v1.5, {args.resolution}x{args.resolution}, batch {args.batch}, {precision}, channels_last, "
          f"trainer optimizer {args.optimizer}, "
          f"compile={args.compile}, on {name}")
    plain, ours = [], []
    for r in range(args.repeats):
        plain.append(plain_loop(device, args.resolution, args.batch, args.steps, args.warmup, args.compile))
        ours.append(largebatch_run(device, args.resolution, args.batch, args.steps, args.warmup, args.compile,
                                   args.optimizer))
        print(f"  repeat {r + 1}: plain {plain[-1]:,.0f} img/s, largebatch {ours[-1]:,.0f} img/s", flush=True)
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"plain torchvision + autocast loop: {p:,.0f} img/s | largebatch trainer: {o:,.0f} img/s | "
          f"ratio {o / p:.2f}x")


if __name__ == "__main__":
    main()
