"""Data-parallel overhead on this machine: 1 process x 2 threads vs 2 gloo processes x 1 thread.

    .venv/bin/python benchmarks/ddp.py                      # MNIST/LeNet, batch 8192, ~3 min on 2 cores
    .venv/bin/python benchmarks/ddp.py --epochs 4 --repeats 2

Both arms are real `largebatch train` runs of the `mnist-lenet-lars-8k` recipe (same global batch,
same data order, same weights up to fp32 rounding), timed by the trainer itself (training time only,
evaluation and checkpoints excluded), run one after the other and alternated when repeated. The
communication share comes from a separate torchrun measurement of one training step per rank with
DDP's gradient all-reduce vs the same step under `no_sync()` (no communication at all), plus the
time of a bare all-reduce of the 431,080 LeNet gradients. (CPU only so far: the single-GPU NCCL
overhead arm needs a GPU machine, which this work has not had.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_run(out: Path, name: str, nproc: int, threads: int, args: argparse.Namespace) -> dict:
    flags = ["--recipe", "mnist-lenet-lars-8k", "--batch.global-batch", str(args.batch), "--epochs", str(args.epochs),
             "--schedule.warmup-epochs", str(min(2.0, args.epochs / 2)),  # the recipe's 2, within short runs
             "--eval.every-epochs", "0", "--checkpoint.every-epochs", "0", "--data.test-limit", "1000",
             "--threads", str(threads), "--device", args.device, "--output-dir", str(out), "--output.name", name,
             "--output.no-progress"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "largebatch", "train", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "largebatch", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads((out / name / "summary.json").read_text())


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: time one step with and without the gradient all-reduce, and a bare all-reduce."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from largebatch import distributed
    from largebatch.config import DataConfig, DistributedConfig
    from largebatch.data import load_splits
    from largebatch.models import build_model

    torch.set_num_threads(args.threads)
    with distributed.session(DistributedConfig(), args.device) as (d, device):
        split = load_splits(DataConfig(), device, channels_last=True)["train"]
        torch.manual_seed(0)
        plain = build_model("lenet").to(device).to(memory_format=torch.channels_last)
        model = distributed.wrap_model(plain, d, DistributedConfig())
        per_rank = args.batch // d.world_size
        micro = min(per_rank, 1024)
        idx = torch.arange(d.rank * per_rank, (d.rank + 1) * per_rank, device=device)

        def step(sync: bool) -> None:
            chunks = idx.split(micro)
            for i, chunk in enumerate(chunks):
                x, y = split.get(chunk)
                with distributed.sync_context(model, sync=sync and i == len(chunks) - 1):
                    F.cross_entropy(model(x), y).backward()
            for p in plain.parameters():
                p.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()

        def timed(fn, n: int) -> float:
            fn()  # warm-up
            dist.barrier()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            dist.barrier()
            return (time.perf_counter() - t) / n

        times = {"sync": [], "no_sync": []}
        for _ in range(args.steps):  # alternate so drift on a shared machine hits both arms
            times["sync"].append(timed(lambda: step(True), 1))
            times["no_sync"].append(timed(lambda: step(False), 1))
        grads = torch.zeros(sum(p.numel() for p in plain.parameters()), device=device)
        allreduce = timed(lambda: dist.all_reduce(grads), 20)
        if d.is_main:
            sync, no_sync = statistics.median(times["sync"]), statistics.median(times["no_sync"])
            print(json.dumps({"sync_s": sync, "no_sync_s": no_sync, "allreduce_s": allreduce,
                              "grad_mib": grads.numel() * 4 / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm in the communication measurement")
    ap.add_argument("--device", default="cpu", choices=["cpu"])
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    rates: dict[str, list[float]] = {"single": [], "ddp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm in (["single", "ddp"] if r % 2 == 0 else ["ddp", "single"]):  # alternate against drift
                nproc, threads = (1, 2) if arm == "single" else (2, 1)
                s = train_run(Path(tmp), f"{arm}-{r}", nproc, threads, args)
                rates[arm].append(s["train_images_per_second"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--worker",
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device, "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"communication measurement failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    comm = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])

    single, ddp = statistics.median(rates["single"]), statistics.median(rates["ddp"])
    share = max(0.0, comm["sync_s"] - comm["no_sync_s"]) / comm["sync_s"]
    print(f"MNIST/LeNet, LARS, global batch {args.batch}, {args.epochs:g} epochs, {args.repeats} repeat(s), "
          f"device {args.device}")
    print("| arm | processes x threads | train images/s |")
    print("|---|---|---|")
    print(f"| single process | 1 x 2 | {single:,.0f} |")
    print(f"| DDP (gloo) | 2 x 1 | {ddp:,.0f} |")
    print(f"DDP / single = {ddp / single:.2f}x")
    print(f"step per rank ({args.batch // 2} examples): {1e3 * comm['sync_s']:.1f} ms with the gradient all-reduce, "
          f"{1e3 * comm['no_sync_s']:.1f} ms without -> communication {100 * share:.1f}% of the step; "
          f"bare all-reduce of {comm['grad_mib']:.2f} MiB: {1e3 * comm['allreduce_s']:.2f} ms")


if __name__ == "__main__":
    main()
