"""`largebatch plan --calibrate`: measure this machine and write a profile that later plans reuse (--profile FILE).

- Collectives: `procs` processes (gloo on CPU, NCCL on GPUs, one GPU each) all-reduce float32 messages of a few
  sizes; the ring model t(n) = 2(p-1) alpha + 2(p-1)/p n / bw (`comm.ring_allreduce`) is fitted to the medians by
  least squares (`fit_alpha_beta`) and shown against them, message by message.
- Compute: forward + backward of the recipe's model at a few micro-batch sizes on this device; t(b) = a + c b
  (`compute.fit_line`) gives the measured FLOP/s F / c and the half-efficiency batch h = a / c (the profile states
  efficiency 1: its peak is the measured rate of this model).
- Memory bandwidth: a large tensor copy (read + write), for the optimizer step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from largebatch.config import ConfigError
from largebatch.plan.comm import ring_allreduce
from largebatch.plan.compute import fit_line, measure_step_times

MESSAGE_BYTES = (4 * 2**10, 64 * 2**10, 1 * 2**20, 4 * 2**20)
"""Message sizes of the collective calibration (float32 tensors)."""


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float], p: int) -> tuple[float, float]:
    """(alpha in s, bandwidth in bytes/s) of the ring all-reduce model fitted to measured (bytes, seconds): the line
    t = A + S n has A = 2(p-1) alpha and S = 2(p-1) / (p bw) (Patarasuk & Yuan 2009)."""
    intercept, slope = fit_line(sizes, seconds)
    if slope <= 0:
        raise ConfigError("calibration: the all-reduce time did not grow with the message size; rerun on a quieter "
                          "machine or with larger messages")
    return intercept / (2 * (p - 1)), 2 * (p - 1) / (p * slope)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, sizes: Sequence[int], repeats: int, backend: str,
                       queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    medians = []
    for n in sizes:
        x = torch.ones(n // 4, device=device)
        dist.all_reduce(x)  # warm-up (connection set-up)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        medians.append(statistics.median(samples))
    if rank == 0:
        queue.put(medians)
    dist.barrier()
    dist.destroy_process_group()


def measure_allreduce(procs: int, sizes: Sequence[int] = MESSAGE_BYTES, repeats: int = 10,
                      timeout: float = 120.0) -> list[float]:
    """Median seconds of an all-reduce of each of `sizes` bytes across `procs` local processes (gloo, or NCCL when
    there are as many GPUs)."""
    import torch.multiprocessing as mp

    if procs < 2:
        raise ConfigError(f"--procs {procs} is invalid: a collective needs 2 or more processes (2-4)")
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= procs else "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    workers = [ctx.Process(target=_collective_worker, args=(r, procs, port, tuple(sizes), repeats, backend, queue))
               for r in range(procs)]
    for w in workers:
        w.start()
    deadline = time.time() + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.time()))
    if any(w.is_alive() or w.exitcode != 0 for w in workers):
        for w in workers:
            if w.is_alive():
                w.kill()
        raise RuntimeError(f"calibration: the {backend} all-reduce processes failed or did not finish in {timeout} s")
    return queue.get()


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a tensor copy on the CPU (read + write: 2 nbytes per copy)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(samples)


def calibrate(recipe: str, procs: int, batches: Sequence[int] = (8, 32, 128)) -> dict:
    """A measured profile of this machine (module docstring) as a dict of profile fields, with what was measured."""
    from largebatch.models.registry import build_model, resolve
    from largebatch.plan.workload import data_shape, model_flops
    from largebatch.study.recipe import load_recipe

    cfg = load_recipe(recipe)
    shape = data_shape(cfg)
    flops, _ = model_flops(cfg.model.name, shape)
    model = build_model(cfg.model.name, num_classes=shape.classes, in_channels=shape.channels,
                        factory=resolve(cfg.model.name), image_size=shape.size)
    seconds = measure_step_times(model, lambda n: torch.randn(n, shape.channels, shape.size, shape.size), batches)
    a, c = fit_line(batches, seconds)
    collective = measure_allreduce(procs)
    alpha, bw = fit_alpha_beta(MESSAGE_BYTES, collective, procs)
    gpu = torch.cuda.is_available()
    return {
        "name": f"local-{platform.node() or 'machine'}",
        "description": f"measured by largebatch plan --calibrate ({platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs{', ' + torch.cuda.get_device_name() if gpu else ''})",
        "kind": "accelerator" if gpu else "cpu", "peak_flops": flops / c, "efficiency": 1.0, "half_batch": a / c,
        "memory_bandwidth": measure_copy_bandwidth(), "grad_bytes": 4, "topology": "ring", "chips_per_node": procs,
        "levels": [{"name": "nccl-local" if gpu else "gloo-local", "bandwidth": bw, "latency": alpha}],
        "sources": f"measured {datetime.datetime.now().isoformat(timespec='seconds')}",
        "measured": {"model": cfg.model.name, "flops_per_example": flops, "micro_batches": list(batches),
                     "step_seconds": seconds, "procs": procs, "message_bytes": list(MESSAGE_BYTES),
                     "allreduce_seconds": collective,
                     "allreduce_predicted": [ring_allreduce(n, procs, alpha, bw) for n in MESSAGE_BYTES]},
    }


def report(profile: dict) -> list[str]:
    """Predicted vs measured, as text lines."""
    m = profile["measured"]
    lv = profile["levels"][0]
    lines = [f"compute ({m['model']}, {m['flops_per_example'] / 1e9:.3g} GFLOP/example): "
             f"{profile['peak_flops'] / 1e9:.1f} GFLOP/s measured, half-efficiency batch {profile['half_batch']:.1f}",
             *(f"  micro-batch {b:>4}: {1e3 * t:8.2f} ms" for b, t in zip(m["micro_batches"], m["step_seconds"])),
             f"all-reduce across {m['procs']} processes: alpha {1e6 * lv['latency']:.1f} us, "
             f"bandwidth {lv['bandwidth'] / 1e9:.3f} GB/s (ring model)",
             f"  {'bytes':>9} {'measured':>10} {'predicted':>10} ratio"]
    for n, t, p in zip(m["message_bytes"], m["allreduce_seconds"], m["allreduce_predicted"]):
        lines.append(f"  {n:>9,} {1e3 * t:8.3f}ms {1e3 * p:8.3f}ms {p / t:.2f}x")
    lines.append(f"memory copy bandwidth {profile['memory_bandwidth'] / 1e9:.1f} GB/s")
    return lines


def calibrate_main(args: argparse.Namespace) -> int:
    """--calibrate: measure, print predicted vs measured, write the profile to --profile-out."""
    if not 2 <= args.procs <= 64:
        raise ConfigError(f"--procs {args.procs} is invalid: give 2 to 64 processes (2-4 on a small machine)")
    out = Path(args.profile_out)
    if out.suffix != ".json":
        raise ConfigError(f"--profile-out {out}: name a .json file (e.g. runs/plan/local-profile.json)")
    profile = calibrate(args.recipe or "mnist-lenet", args.procs)
    print("\n".join(report(profile)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n")
    print(f"[largebatch] profile -> {out} (largebatch plan --profile {out} ...)")
    return 0
