"""Data-parallel overhead on this machine: 1 process x 2 threads vs 2 gloo processes x 1 thread.

    .venv/bin/python benchmarks/ddp.py                      # MNIST/LeNet, batch 8192, ~3 min on 2 cores
    .venv/bin/python benchmarks/ddp.py --epochs 4 --repeats 2
    .venv/bin/python benchmarks/ddp.py --device cuda        # NCCL over every GPU here (benchmarks/gpu_suite.sh)

Both arms are real `largebatch train` runs of the `mnist-lenet-lars-8k` recipe (same global batch,
same data order, same weights up to fp32 rounding), timed by the trainer itself (training time only,
evaluation and checkpoints excluded), run one after the other and alternated when repeated. The
communication share comes from a separate torchrun measurement of one training step per rank with
DDP's gradient all-reduce vs the same step under `no_sync()` (no communication at all), plus the
time of a bare all-reduce of the 431,080 LeNet gradients. With --device cuda the ranks are --nproc GPUs (default:
all of them) on NCCL: the trainer arms are 1 GPU vs --nproc GPUs (the second only with 2 or more), and the
communication measurement runs even on one GPU, where the worker forms a 1-rank NCCL group itself (the trainer
forms none for a single process) to time DDP's own overhead.
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


def train_run(out: Path, name: str, nproc: int, threads: int | str, args: argparse.Namespace) -> dict:
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
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if isinstance(threads, int) else {})}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads((out / name / "summary.json").read_text())


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: time one step with and without the gradient all-reduce, and a bare all-reduce."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from largebatch import distributed
    from largebatch.config import DataConfig, DistributedConfig
    from largebatch.data import load_splits
    from largebatch.models import build_model

    torch.set_num_threads(args.threads)
    one_rank = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if one_rank:  # the trainer forms no group for one process: form one here to time DDP itself
        if args.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    with distributed.session(DistributedConfig(), args.device) as (d, device):
        split = load_splits(DataConfig(), device, channels_last=True)["train"]
        torch.manual_seed(0)
        plain = build_model("lenet").to(device).to(memory_format=torch.channels_last)
        model = (DistributedDataParallel(plain, device_ids=[device] if device.type == "cuda" else None) if one_rank
                 else distributed.wrap_model(plain, d, DistributedConfig()))
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
    if one_rank:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm in the communication measurement")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=0, help="ranks (0: 2 on cpu, every GPU on cuda)")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cuda = args.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        args.nproc = args.nproc or torch.cuda.device_count()
    args.nproc = args.nproc or 2
    # (ranks, --threads) of each arm: on CPU 2 threads in one process vs 1 per rank; on GPUs the trainer's auto
    shape = {"single": (1, "auto" if cuda else 2), "ddp": (args.nproc, "auto" if cuda else 2 // args.nproc or 1)}
    arms = ["single", "ddp"] if args.nproc > 1 else ["single"]

    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm in (arms if r % 2 == 0 else arms[::-1]):  # alternate against drift
                s = train_run(Path(tmp), f"{arm}-{r}", *shape[arm], args)
                rates[arm].append(s["train_images_per_second"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", __file__,
           "--worker",
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device, "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"communication measurement failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    comm = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])

    med = {arm: statistics.median(v) for arm, v in rates.items()}
    share = max(0.0, comm["sync_s"] - comm["no_sync_s"]) / comm["sync_s"]
    print(f"MNIST/LeNet, LARS, global batch {args.batch}, {args.epochs:g} epochs, {args.repeats} repeat(s), "
          f"device {args.device}")
    print(f"| arm | {'processes x GPU' if cuda else 'processes x threads'} | train images/s |")
    print("|---|---|---|")
    for arm in arms:
        ranks, threads = shape[arm]
        label = "single process" if arm == "single" else f"DDP ({'nccl' if cuda else 'gloo'})"
        print(f"| {label} | {ranks} x {1 if cuda else threads} | {med[arm]:,.0f} |")
    if "ddp" in med:
        print(f"DDP / single = {med['ddp'] / med['single']:.2f}x")
    print(f"step per rank ({args.batch // args.nproc} examples, {args.nproc} rank(s)): "
          f"{1e3 * comm['sync_s']:.1f} ms with the gradient all-reduce, "
          f"{1e3 * comm['no_sync_s']:.1f} ms without -> communication {100 * share:.1f}% of the step; "
          f"bare all-reduce of {comm['grad_mib']:.2f} MiB: {1e3 * comm['allreduce_s']:.2f} ms")


if __name__ == "__main__":
    main()
