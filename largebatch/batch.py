"""Batch arithmetic: the one place where batch-invariant settings become per-step numbers.

The user states the global batch B (examples per optimizer step), a base LR at a reference
batch and a length in epochs. This module derives

    B = world_size x accum_steps x micro_batch

from an explicit micro-batch or a memory cap, the peak LR from a scaling rule, and the step
count from the epochs. Every mismatch raises an error that names the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from largebatch.config import ConfigError

GiB = 1024**3

# Peak memory of a training step relative to the tensors autograd saves in the forward pass:
# backward holds the saved activations plus gradients of the same size, and a few kernels
# (max-pool backward, im2col) need a transient buffer as large as their input. Measured on LeNet
# (CPU, fp32) at 1.9-2.3x; 3x leaves room for allocator slack.
BACKWARD_FACTOR = 3.0

# Default bound on the derived micro-batch on CPU, by compute precision (`cpu_micro_batch`). fp32: activations of a
# smaller pass stay in cache; LeNet at global batch 8192 on a 2-core AVX2 EPYC ran 3,199 images/s in one pass, 4,024
# in passes of 2,048, 5,246 of 1,024 and 5,477 of 256 (2026-11, glibc's page faults included), so 512. bf16 (a CPU
# with AMX or AVX512-BF16): on a 2-core AMX Xeon with freed memory kept (`largebatch.malloc`), `largebatch train
# --recipe mnist-lenet-lars-8k` ran 14.6K images/s in passes of 512, 16.5K of 1,024, 17.5K of 2,048, 18.5K of 4,096
# and of 8,192 (benchmarks/micro_batch.py, benchmarks/results/micro-batch-amx.md; 2026-12-03): fewer passes wake
# the idle threads less often, and bf16 activations are half the bytes. 4,096 since then (512 on 2026-12-02, 1,024
# before): bf16 runs of a global batch above 512 on CPU now sum their gradient in other groups, a rounding
# difference; `--batch.micro-batch-limit 512` reproduces the earlier ones.
CPU_MICRO_BATCH = {"fp32": 512, "bf16": 4096}


def cpu_micro_batch(autocast: torch.dtype | None) -> int:
    """The default micro-batch bound on CPU for compute precision `autocast` (None: fp32 or fp64)."""
    return CPU_MICRO_BATCH["bf16" if autocast == torch.bfloat16 else "fp32"]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step of `global_batch` examples is split."""

    global_batch: int
    world_size: int
    micro_batch: int
    accum_steps: int
    est_step_bytes: int = 0  # estimated peak training memory per rank (0: not estimated)

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accum_steps

    def describe(self) -> str:
        est = f", estimated peak {self.est_step_bytes / GiB:.2f} GiB/rank" if self.est_step_bytes else ""
        return (f"global batch {self.global_batch} = {self.world_size} rank(s) x {self.accum_steps} "
                f"accumulation step(s) x micro-batch {self.micro_batch}{est}")


def plan_batch(global_batch: int, world_size: int = 1, micro_batch: int = 0,
               per_example_bytes: int = 0, fixed_bytes: int = 0, cap_bytes: int = 8 * GiB,
               prefer_at_most: int = 0) -> BatchPlan:
    """Split a global batch into world x accumulation x micro-batch.

    With `micro_batch` > 0 it must divide the per-rank batch. With `micro_batch` == 0 the largest
    divisor of the per-rank batch whose estimated memory (fixed + micro x per-example) fits under
    `cap_bytes` is chosen, and no larger than `prefer_at_most` (when > 0) unless that bound would
    force a micro-batch under a quarter of it (a batch with few divisors). Raises ConfigError
    naming the numbers when no split exists.
    """
    if global_batch % world_size:
        raise ConfigError(f"batch.global_batch = {global_batch} is not divisible by the world size {world_size}: "
                          f"use a multiple of {world_size}")
    per_rank = global_batch // world_size
    budget = cap_bytes - fixed_bytes
    if micro_batch:
        if per_rank % micro_batch:
            raise ConfigError(f"batch.micro_batch = {micro_batch} does not divide the per-rank batch {per_rank} "
                              f"(= {global_batch} / {world_size} ranks): choose a divisor of {per_rank}")
        need = fixed_bytes + micro_batch * per_example_bytes
        if per_example_bytes and need > cap_bytes:
            raise ConfigError(f"batch.micro_batch = {micro_batch} needs about {need / GiB:.2f} GiB, over "
                              f"batch.memory_cap_gib = {cap_bytes / GiB:g}: lower the micro-batch or raise the cap")
    else:
        if per_example_bytes <= 0:
            micro_batch = per_rank
        else:
            limit = budget // per_example_bytes
            if limit < 1:
                raise ConfigError(f"batch.memory_cap_gib = {cap_bytes / GiB:g} is too small: the model alone needs "
                                  f"about {(fixed_bytes + per_example_bytes) / GiB:.2f} GiB at micro-batch 1")
            micro_batch = largest_divisor_at_most(per_rank, limit)
        if prefer_at_most and micro_batch > prefer_at_most:
            preferred = largest_divisor_at_most(per_rank, prefer_at_most)
            if 4 * preferred >= prefer_at_most:
                micro_batch = preferred
    est = fixed_bytes + micro_batch * per_example_bytes if per_example_bytes else 0
    return BatchPlan(global_batch, world_size, micro_batch, per_rank // micro_batch, est)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest d with d | n and d <= limit (n >= 1, limit >= 1)."""
    if limit >= n:
        return n
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


def scale_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Peak LR at `global_batch` from `base_lr` tuned at `reference_batch`.

    linear: Goyal et al. 2017 (k x the batch, k x the LR); sqrt: Krizhevsky 2014 / Hoffer et al.
    2017 (keeps the gradient-noise variance of the step constant); none: the LR as given.
    """
    k = global_batch / reference_batch
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ConfigError(f"optimizer.scaling = {rule!r} is invalid: must be one of linear, sqrt, none")


def total_steps(epochs: float, dataset_size: int, global_batch: int) -> int:
    """Optimizer steps for `epochs` passes over `dataset_size` examples: ceil(epochs x N / B).

    The data is one stream of per-epoch permutations, so a batch may straddle an epoch boundary
    and no example is dropped: at any batch size, `epochs` means the same number of examples.
    """
    if global_batch > dataset_size:
        raise ConfigError(f"batch.global_batch = {global_batch} exceeds the training set ({dataset_size} examples): "
                          f"the largest batch is the full batch, {dataset_size}")
    return max(1, math.ceil(epochs * dataset_size / global_batch - 1e-9))


def epochs_to_steps(epochs: float, dataset_size: int, global_batch: int) -> int:
    """A duration in epochs as a whole number of steps (rounded to nearest, at least 0)."""
    return max(0, round(epochs * dataset_size / global_batch))


def epoch_at(step: int, dataset_size: int, global_batch: int) -> float:
    """Epochs completed after `step` optimizer steps."""
    return step * global_batch / dataset_size


def saved_activation_bytes(model: nn.Module, sample: torch.Tensor, autocast_dtype: torch.dtype | None) -> int:
    """Bytes autograd saves for backward in one forward pass of `sample` (storages counted once).

    Uses `torch.autograd.graph.saved_tensors_hooks`, so it sees exactly what backward will hold.
    """
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # views of weights cost nothing

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(sample.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(sample)
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    del out
    return sum(seen.values())


class OpFlops(TorchDispatchMode):
    """Counts the matrix multiplies and convolutions (the ops torch's `flop_registry` prices) dispatched inside it
    and their FLOPs: `with OpFlops() as ops: model(x)`, then `ops.mean()`. Other ops pass through uncounted.

    `largebatch.threads.fit_to_work` reads the average to give a step no more threads than its ops can use; the
    trainer counts on the memory probe's forward (`probe_forward`), so no pass runs for it alone. What it is: the
    unweighted mean over the priced calls of one forward. Which ops are priced is torch's registry, and it varies
    by version and device: on CPU torch 2.14 prices mm, addmm, bmm, baddbmm and convolutions but not the CPU
    flash-attention kernel behind `scaled_dot_product_attention` (gpt-mini's 12 MFLOP at batch 2 is the mean of its
    17 linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry  # here: its import costs every `largebatch.batch` user

        self.registry = flop_registry
        self.flops, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        price = self.registry.get(func._overloadpacket)
        if price is not None:
            try:
                self.flops += price(*args, **kwargs, out_val=out)
                self.calls += 1
            except Exception:  # a form torch's formula does not read: uncounted (the count only sizes threads)
                pass
        return out

    def mean(self, scale: float = 1.0) -> float | None:
        """FLOPs of the average counted op x `scale` (None where none was counted)."""
        return self.flops * scale / self.calls if self.calls else None


PROBE_BATCH = 16
"""Examples in the memory probe's forward (`estimate_per_example_bytes`)."""


def estimate_per_example_bytes(model: nn.Module, example: torch.Tensor, autocast_dtype: torch.dtype | None,
                               probe_batch: int = PROBE_BATCH) -> int:
    """Estimated peak training bytes per example: saved activations x BACKWARD_FACTOR.

    The probe forward runs in training mode; buffers it updates (batch-norm running statistics) are
    restored, so the estimate leaves the model as it found it.
    """
    sample = example.expand(probe_batch, *example.shape[1:]).contiguous()
    sample = sample.to(memory_format=torch.channels_last) if sample.dim() == 4 else sample
    buffers = [b.clone() for b in model.buffers()]
    saved = saved_activation_bytes(model, sample, autocast_dtype)
    with torch.no_grad():
        for b, old in zip(model.buffers(), buffers):
            b.copy_(old)
    return math.ceil(BACKWARD_FACTOR * saved / probe_batch)


def probe_forward(model: nn.Module, example: torch.Tensor, autocast_dtype: torch.dtype | None,
                  count_ops: bool = True) -> tuple[int, float | None]:
    """(`estimate_per_example_bytes`, the FLOPs of the average matmul/convolution of its forward per example, or
    None) from one forward; `count_ops=False`, or a model whose forward cannot run under a dispatch mode (e.g.
    FlexAttention's higher-order op), gives None, its forward run again without `OpFlops`."""
    if count_ops:
        try:
            with OpFlops() as ops:
                per_example = estimate_per_example_bytes(model, example, autocast_dtype)
            return per_example, ops.mean(1 / PROBE_BATCH)
        except Exception:  # not under a dispatch mode: the estimate alone (a model's own error recurs below)
            pass
    return estimate_per_example_bytes(model, example, autocast_dtype), None


def model_state_bytes(model: nn.Module, optimizer_slots: int = 2) -> int:
    """Weights + gradients + `optimizer_slots` state tensors per weight, in bytes."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n * (2 + optimizer_slots)


@dataclass(frozen=True)
class RunPlan:
    """The numbers a run derives once, before its first step, from its config, its data and its world: read by
    the loop, the LR schedule, env.json, time-to-target and the summary, so each is derived in one place.

    `schedule(step)` is the LR multiplier of step `step` (`largebatch.schedules`), so the LR of a step is
    `lr(step)` = peak_lr x schedule(step); `end_lr` is the LR the decay ends at (after the last step).
    """

    batch: BatchPlan
    dataset_size: int
    steps: int
    peak_lr: float
    warmup_steps: int
    schedule: Callable[[int], float] = field(compare=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch.global_batch

    @property
    def end_lr(self) -> float:
        return self.peak_lr * self.schedule(self.steps)

    def lr(self, step: int) -> float:
        return self.peak_lr * self.schedule(step)

    def epoch(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return epoch_at(step, self.dataset_size, self.global_batch)

    def crossed(self, step: int, every_epochs: float) -> bool:
        """Did step `step` (a 1-based count) cross a multiple of `every_epochs` epochs? (0: never)."""
        if not every_epochs:
            return False
        e0, e1 = (self.epoch(k) / every_epochs for k in (step - 1, step))
        return math.floor(e1 + 1e-9) > math.floor(e0 + 1e-9)

    def describe(self, base_lr: float, reference_batch: int, scaling: str, epochs: float) -> list[str]:
        """The lines the trainer prints once at the start."""
        return [self.batch.describe(),
                f"peak LR {self.peak_lr:.6g} = base {base_lr:g} at batch {reference_batch} scaled {scaling}; "
                f"{self.steps} steps = {epochs:g} epochs x {self.dataset_size} / {self.global_batch}; "
                f"warmup {self.warmup_steps} steps"]

    def to_dict(self) -> dict:
        """The plan as JSON-able numbers (env.json)."""
        return {"global_batch": self.global_batch, "world_size": self.batch.world_size,
                "micro_batch": self.batch.micro_batch, "accum_steps": self.batch.accum_steps,
                "train_examples": self.dataset_size, "steps": self.steps, "peak_lr": self.peak_lr,
                "warmup_steps": self.warmup_steps, "end_lr": self.end_lr}
