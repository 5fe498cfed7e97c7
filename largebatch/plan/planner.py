"""Time to train: step time x steps to target, over chip counts and global batch sizes; the best choice; the frontier.

One synchronous data-parallel step on p chips at global batch B (per-chip batch b = ceil(B / p)):

    step = compute(b) + exposed communication + optimizer step
    compute(b)       `compute.step_compute_time`: forward + backward of b examples (backward = 2/3 of it)
    communication    the gradient all-reduce of n = params x grad_bytes (`comm.allreduce_time`), cut into DDP
                     buckets overlapped with the backward pass (`comm.exposed_time`); with weight-update sharding
                     (Ying et al. 2018; Xu et al. 2020) a bucketed reduce-scatter overlaps the backward and the
                     all-gather of the updated weights after the step is exposed
    optimizer step   memory-bound: params x optimizer_bytes_per_param / memory bandwidth (momentum SGD or LARS in
                     fp32 reads weight, gradient and momentum and writes weight and momentum: 5 x 4 = 20 bytes),
                     divided by p when the update is sharded

time to train = steps x step + evaluations (forward passes over the evaluation set, every eval_every_epochs),
steps = epochs(B) x N / B (`convergence`). chip-hours = p x time to train / 3600.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

from largebatch.config import ConfigError
from largebatch.plan.comm import (DDP_BUCKET_BYTES, allreduce_time, bucket_sizes, exposed_time,
                                  reduce_scatter_time)
from largebatch.plan.compute import step_compute_time
from largebatch.plan.convergence import Convergence
from largebatch.plan.hardware import Profile

BACKWARD_SHARE = 2 / 3
"""Backward FLOPs are about twice the forward's (weight and input gradients): 2/3 of forward + backward."""


@dataclass(frozen=True)
class Workload:
    """What is trained: FLOPs of forward + backward per example, parameters, training examples N, epochs(B), and
    the evaluation (examples, every how many epochs; 0: once at the end)."""

    name: str
    flops_per_example: float
    params: int
    dataset_size: int
    convergence: Convergence
    eval_examples: int = 0
    eval_every_epochs: float = 0.0


@dataclass(frozen=True)
class Options:
    """How the step runs: topology (None: the profile's), gradient bytes (None: the profile's; 2 = bf16 halves the
    bytes), weight-update sharding, DDP bucket size, overlap with the backward pass, parameter servers, and the
    optimizer's memory traffic per parameter."""

    topology: str | None = None
    grad_bytes: int | None = None
    shard_weights: bool = False
    bucket_bytes: float = DDP_BUCKET_BYTES
    overlap: bool = True
    servers: int = 1
    optimizer_bytes_per_param: float = 20.0


@dataclass(frozen=True)
class Row:
    """One (chips, batch) point of a plan; times in seconds (None where the batch has no known steps to target)."""

    chips: int
    batch: int
    per_chip: int
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    optimizer_s: float
    eval_per_step_s: float | None
    step_s: float
    epochs: float | None
    steps: int | None
    time_to_train_s: float | None
    chip_hours: float | None


COLUMNS = tuple(f.name for f in fields(Row))
"""The plan's CSV columns, in order."""


def check_point(chips: int, batch: int) -> None:
    """ConfigError unless `batch` examples can be spread over `chips` chips (at least one each)."""
    if chips < 1:
        raise ConfigError(f"chips = {chips} is invalid: give 1 or more chips")
    if batch < chips:
        raise ConfigError(f"global batch {batch} is smaller than {chips} chips: every chip needs at least one example "
                          f"per step; use at most {batch} chips or a batch of at least {chips}")


def communication(w: Workload, profile: Profile, chips: int, backward: float, opt: Options) -> tuple[float, float]:
    """(total, exposed) seconds of the gradient exchange of one step (the module docstring)."""
    n = w.params * (opt.grad_bytes or profile.grad_bytes)
    sizes = bucket_sizes(n, opt.bucket_bytes)
    if opt.shard_weights:
        gather = reduce_scatter_time(n, chips, profile, opt.topology)  # the all-gather costs the reduce-scatter
        costs = [reduce_scatter_time(s, chips, profile, opt.topology) for s in sizes]
        total = sum(costs) + gather
        hidden = exposed_time(sizes, costs, backward) if opt.overlap else sum(costs)
        return total, hidden + gather
    costs = [allreduce_time(s, chips, profile, opt.topology, opt.servers) for s in sizes]
    if not opt.overlap:
        fused = allreduce_time(n, chips, profile, opt.topology, opt.servers)
        return fused, fused
    return sum(costs), exposed_time(sizes, costs, backward)


def evaluation_time(w: Workload, profile: Profile, chips: int) -> float:
    """Seconds of one evaluation: forward passes (1/3 of forward + backward) over the evaluation set on `chips`."""
    if w.eval_examples <= 0:
        return 0.0
    eff, half = profile.sustained
    per_chip = math.ceil(w.eval_examples / chips)
    return step_compute_time(w.flops_per_example * (1 - BACKWARD_SHARE), per_chip, profile.peak_flops, eff, half)


def point(w: Workload, profile: Profile, chips: int, batch: int, opt: Options = Options()) -> Row:
    """The plan of one (chips, batch) point (the module docstring)."""
    check_point(chips, batch)
    eff, half = profile.sustained
    per_chip = math.ceil(batch / chips)
    compute = step_compute_time(w.flops_per_example, per_chip, profile.peak_flops, eff, half)
    comm, exposed = communication(w, profile, chips, BACKWARD_SHARE * compute, opt)
    optimizer = w.params * opt.optimizer_bytes_per_param / profile.memory_bandwidth if profile.memory_bandwidth else 0
    optimizer /= chips if opt.shard_weights else 1
    step = compute + exposed + optimizer
    epochs = w.convergence.epochs(batch)
    if epochs is None:
        return Row(chips, batch, per_chip, compute, comm, exposed, optimizer, None, step, None, None, None, None)
    steps = math.ceil(epochs * w.dataset_size / batch)
    evals = math.ceil(epochs / w.eval_every_epochs) if w.eval_every_epochs > 0 else 1
    eval_total = evals * evaluation_time(w, profile, chips)
    total = steps * step + eval_total
    return Row(chips, batch, per_chip, compute, comm, exposed, optimizer, eval_total / steps, step, epochs, steps,
               total, chips * total / 3600)


def plan(w: Workload, profile: Profile, chips: Sequence[int], batches: Sequence[int],
         opt: Options = Options()) -> list[Row]:
    """Every possible (chips, batch) point; pairs with fewer examples than chips are left out (ConfigError if no
    pair is possible)."""
    rows = [point(w, profile, p, b, opt) for b in batches for p in chips if b >= p]
    if not rows:
        raise ConfigError(f"every global batch ({', '.join(map(str, batches))}) is smaller than every chip count "
                          f"({', '.join(map(str, chips))}): give larger --batch-sizes or fewer --chips")
    return rows


def best(rows: Sequence[Row], max_chips: int | None = None, budget_chip_hours: float | None = None) -> Row | None:
    """The fastest known point within `max_chips` chips and `budget_chip_hours` chip-hours (None: no such point)."""
    ok = [r for r in rows if r.time_to_train_s is not None and (max_chips is None or r.chips <= max_chips)
          and (budget_chip_hours is None or r.chip_hours <= budget_chip_hours)]
    return min(ok, key=lambda r: (r.time_to_train_s, r.chip_hours), default=None)


def frontier(rows: Sequence[Row]) -> list[Row]:
    """The efficient frontier: points no other point beats on both time to train and chip-hours, fastest first."""
    known = sorted((r for r in rows if r.time_to_train_s is not None), key=lambda r: (r.time_to_train_s, r.chip_hours))
    out: list[Row] = []
    for r in known:
        if not out or r.chip_hours < out[-1].chip_hours:
            out.append(r)
    return out
