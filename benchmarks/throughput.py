"""Training throughput: the largebatch trainer vs a plain fp32 eager PyTorch loop, in one run.

    .venv/bin/python benchmarks/throughput.py                    # batch 256 and 8192, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/throughput.py --batches 256 --repeats 5

Both sides train the same LeNet-5 on the same 60,000 MNIST images with momentum SGD.
- plain: the usual `for x, y in DataLoader(TensorDataset(...), shuffle=True)` loop, fp32, NCHW,
  images already normalised floats in memory (the most favourable plain set-up: no per-image
  transforms). `zero_grad(); loss.backward(); opt.step()`.
- largebatch: `largebatch.trainer.train()` itself, with its device-resident uint8 data, channels_last
  and the precision `auto` picks for this machine; images/s from its summary (training time only,
  evaluation and checkpoints excluded).
The two alternate `--repeats` times (the machine is shared and noisy); the median of each is
reported with the ratio. Steps per measurement: `--examples` images after `--warmup` steps.
Each measurement is a fresh process, as a user's run is: the trainer sets process-wide state that a plain loop
in the same process would inherit (glibc malloc's thresholds, `largebatch.malloc`; torch's threads), and a
process's heap grows with what ran in it before. Both sides run with the environment this script gets (torch's
default threads, libgomp's default idle spinning unless OMP_WAIT_POLICY is set).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from largebatch.config import (BatchConfig, CheckpointConfig, DataConfig, EvalConfig, OptimizerConfig, OutputConfig,
                               PrecisionConfig, RunConfig)
from largebatch.data.mnist import MEAN, STD, load_mnist
from largebatch.models import build_model
from largebatch.trainer import train


def plain_loop(batch: int, examples: int, warmup: int) -> float:
    d = load_mnist(None)
    x = (torch.from_numpy(d.train_images.copy()).float().div(255).sub(MEAN).div(STD)).unsqueeze(1)
    y = torch.from_numpy(d.train_labels)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    model = build_model("lenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps = warmup + max(1, examples // batch)
    done, t0 = 0, None
    while done < steps:
        for xb, yb in loader:
            if done == warmup:
                t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return (steps - warmup) * batch / (time.perf_counter() - t0)


def largebatch_summary(batch: int, examples: int, warmup: int, dtype: str = "auto") -> dict:
    """The trainer's summary of warmup + measured steps (its images/s excludes eval/checkpoints).

    The first `warmup` steps are not excluded by the trainer, so they are kept few; at batch 8192
    one warm-up step costs ~3% of the measurement.
    """
    steps = warmup + max(1, examples // batch)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(recipe="bench", epochs=steps * batch / 60000, device="cpu",
                        data=DataConfig(test_limit=1000),
                        optimizer=OptimizerConfig(name="sgd", base_lr=0.01, reference_batch=batch, weight_decay=5e-4),
                        batch=BatchConfig(global_batch=batch), eval=EvalConfig(every_epochs=0),
                        checkpoint=CheckpointConfig(every_epochs=0), precision=PrecisionConfig(dtype),
                        output=OutputConfig(dir=tmp, name="bench", progress=False, log_every=10**9))
        return train(cfg)


def largebatch_run(batch: int, examples: int, warmup: int, dtype: str = "auto") -> float:
    """The trainer's own images/s over warmup + measured steps (`largebatch_summary`)."""
    return largebatch_summary(batch, examples, warmup, dtype)["train_images_per_second"]


def measure(arm: str, batch: int, examples: int, warmup: int) -> float:
    """Images/s of one arm (`plain`, `largebatch` or `bf16`) in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--arm", arm, "--batches", str(batch), "--examples", str(examples),
                          "--warmup", str(warmup)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"throughput.py --arm {arm} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="256,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=40960, help="images per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time the trainer with bf16 autocast")
    ap.add_argument("--arm", choices=("plain", "largebatch", "bf16"), help=argparse.SUPPRESS)  # one measurement
    args = ap.parse_args()
    if args.arm:
        batch = int(args.batches)
        if args.arm == "plain":
            print(plain_loop(batch, args.examples, args.warmup))
        else:
            print(largebatch_run(batch, args.examples, args.warmup, "bf16" if args.arm == "bf16" else "auto"))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rows = []
    for batch in map(int, args.batches.split(",")):
        plain, ours, bf16 = [], [], []
        for _ in range(args.repeats):
            plain.append(measure("plain", batch, args.examples, args.warmup))
            ours.append(measure("largebatch", batch, args.examples, args.warmup))
            if args.bf16:
                bf16.append(measure("bf16", batch, args.examples // 4, 1))
        print(f"batch {batch}: plain {[round(p) for p in plain]}, largebatch {[round(o) for o in ours]}"
              + (f", bf16 {[round(b) for b in bf16]}" if bf16 else ""), flush=True)
        rows.append((batch, statistics.median(plain), statistics.median(ours),
                     statistics.median(bf16) if bf16 else None))
    print(f"\n{'batch':>6} {'plain fp32 img/s':>17} {'largebatch img/s':>17} {'ratio':>6}"
          + (f" {'largebatch bf16 img/s':>22}" if args.bf16 else ""))
    for batch, p, o, b in rows:
        print(f"{batch:>6} {p:>17.0f} {o:>17.0f} {o / p:>5.2f}x" + (f" {b:>22.0f}" if b else ""))


if __name__ == "__main__":
    main()
