"""Synchronous data parallelism on torch.distributed: the only module that imports it.

    python -m largebatch train --recipe mnist-lenet-lars-8k                              # 1 process
    torchrun --nproc-per-node 2 -m largebatch train --recipe mnist-lenet-lars-8k         # 2 processes, gloo
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m largebatch train --recipe ... --output.name my-run                           # 32 GPUs, NCCL

The process group comes from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): gloo on CPU, NCCL on CUDA. A plain `python -m largebatch` run has world size 1 and
every function here is a no-op, so the trainer has one code path. Model code knows nothing of
this module: the trainer hands a plain model to `wrap_model`, which applies group batch norm
(SyncBatchNorm over sub-groups of `bn_span` ranks, MLPerf's "BN span") and DDP. `shard_optimizer`
wraps the optimizer in ZeroRedundancyOptimizer (each rank updates whole tensors of its shard, so
trust-ratio norms stay exact, and the new weights are broadcast to all ranks).

Control messages (stop requests, run names, trust-ratio samples) go over a gloo group even when
training uses NCCL, so they never wait on the GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.config import ConfigError, DistributedConfig
from largebatch.nn import convert_cross_replica_bn


class DistributedError(Exception):
    """The process group could not be formed; the message says what to check."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_control_group: Any = None  # gloo group for small host-side messages (None: the default group)
_owns_group = False  # did init() create the process group (then shutdown() destroys it)


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: first attempt or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def elastic_run_id() -> str:
    """torchrun's --rdzv-id ('' when absent or the default 'none'): stable across restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return "" if run_id in ("", "none") else run_id


def elastic_max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def init(cfg: DistributedConfig, device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group described by the torchrun environment; return (dist, this rank's device).

    Without WORLD_SIZE > 1 in the environment this is a single process and nothing is initialised.
    A rank that does not join within `cfg.timeout_s` makes every rank fail with one line (no hang).
    """
    global _control_group, _owns_group
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(), _device(device_name, 0)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(device_name, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend = 'nccl' needs CUDA devices: use gloo (or auto) on CPU")
    if dist.is_initialized():  # an embedding program already formed the group
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()), device
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        # torchrun keeps one store across restarts; without a per-attempt prefix a restarted rank
        # reads its peers' addresses from the failed attempt (pytorch/pytorch#167288).
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"largebatch/attempt{elastic_restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except dist.DistError as e:
        raise DistributedError(
            f"rank {rank} of {world} could not form the process group at {where} within "
            f"{cfg.timeout_s:g} s ({str(e).splitlines()[0]}): check that all {world} ranks were started with "
            f"the same rendezvous endpoint, or raise --distributed.timeout-s") from None
    _owns_group = True
    return Dist(rank, world, local_rank, backend), device


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA device: use --device cpu (or auto)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def shutdown() -> None:
    """Leave the process group if init() formed it (safe to call more than once)."""
    global _control_group, _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _control_group, _owns_group = None, False


# ---------------------------------------------------------------------------------------------
# model and optimizer


def check(cfg: DistributedConfig, d: Dist) -> None:
    """Settings that depend on the world size, checked before any work starts."""
    span = cfg.bn_span
    if d.enabled and span not in (0, 1) and d.world_size % span:
        raise ConfigError(f"distributed.bn_span = {span} does not divide the world size {d.world_size}: "
                          f"use a divisor of {d.world_size} (1: per-replica BN, 0: all ranks)")


def bn_groups(d: Dist, span: int) -> Any:
    """This rank's process group for batch-norm statistics over `span` consecutive ranks (0: all)."""
    if span in (0, d.world_size):
        return None  # the default group: statistics over every rank
    group, _ = dist.new_subgroups(group_size=span)
    return group


def wrap_model(model: nn.Module, d: Dist, cfg: DistributedConfig, measure_local_grad: bool = False) -> nn.Module:
    """Apply group batch norm and DDP to a plain model; identity for world size 1.

    Per-replica BN (bn_span 1) is plain BatchNorm on each rank's micro-batch; bn_span k pools the
    statistics of k ranks' micro-batches (Ying et al. 2018, "Image classification at supercomputer
    scale", distributed batch norm): torch's SyncBatchNorm on CUDA, and on CPU, where SyncBatchNorm
    refuses to run, `CrossReplicaBatchNorm` over an autograd-aware all-reduce. DDP averages
    gradients across ranks (in fp32 unless grad_allreduce = bf16, which compresses them with a
    communication hook) and broadcasts rank 0's BN buffers before each forward.
    """
    if not d.enabled:
        return model
    device = next(model.parameters()).device
    if cfg.bn_span != 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        group = bn_groups(d, cfg.bn_span)
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
        else:
            model = convert_cross_replica_bn(model, _group_sum(group))
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.grad_allreduce == "bf16" or measure_local_grad:
        state = LocalGradNorm(cfg.grad_allreduce == "bf16")
        ddp.register_comm_hook(state, LocalGradNorm.hook)
        ddp._largebatch_local_norm = state  # DDP keeps no public handle on a hook's state
    return ddp


class LocalGradNorm:
    """DDP communication hook state: the squared norm of this rank's local gradient, read from each
    bucket before it is all-reduced (for the gradient noise scale), when `active`; then the usual
    all-reduce of the mean (fp32, or bf16-compressed)."""

    def __init__(self, bf16: bool = False) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.base = default_hooks.bf16_compress_hook if bf16 else default_hooks.allreduce_hook
        self.active = False
        self.sq: torch.Tensor | None = None

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP checks them, and `from __future__` makes them strings
        if state.active:
            buf = bucket.buffer()
            sq = (buf if buf.dtype == torch.float64 else buf.float()).square().sum()  # fp32, fp64 for fp64 runs
            state.sq = sq if state.sq is None else state.sq + sq
        return state.base(None, bucket)

    def start(self) -> None:
        self.active, self.sq = True, None

    def stop(self) -> torch.Tensor | None:
        self.active = False
        return self.sq


def local_grad_norm(model: nn.Module) -> LocalGradNorm | None:
    """The hook state `wrap_model(..., measure_local_grad=True)` installed (None without DDP)."""
    return getattr(model, "_largebatch_local_norm", None) if isinstance(model, DistributedDataParallel) else None


def _group_sum(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum over `group` (None: all ranks) whose backward sums the gradients over the group."""
    from torch.distributed.nn.functional import all_reduce

    return lambda t: all_reduce(t, op=dist.ReduceOp.SUM, group=group or dist.group.WORLD)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (what checkpoints and evaluation use)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BN running statistics) on every rank, before evaluation and checkpoints.

    DDP broadcasts them at the start of each training forward, so after the last step each rank
    holds statistics updated by its own micro-batch; evaluation must use one model everywhere.
    """
    if d.enabled:
        for b in unwrap(model).buffers():
            dist.broadcast(b, src=0)


def sync_context(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """`no_sync()` for accumulation micro-batches (gradients stay local until the last one)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def shard_optimizer(make: Callable[[list[dict]], torch.optim.Optimizer], groups: list[dict],
                    d: Dist) -> torch.optim.Optimizer:
    """ZeRO-1 weight-update sharding (Xu et al. 2020, "Automatic cross-replica sharding of weight update").

    Whole tensors are assigned to ranks (greedy by size); each rank's optimizer updates and keeps
    state for its tensors only, so per-tensor norms (LARS/LAMB trust ratios) are exact; the
    updated tensors are then broadcast from their owners.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer  # imported when asked for: it loads FSDP (~2 s)

    return ZeroRedundancyOptimizer(groups, optimizer_class=make)


def _is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is a ZeroRedundancyOptimizer (never, unless `shard_optimizer` imported its module)."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that updates this rank's tensors (the inner one under ZeRO)."""
    return optimizer.optim if _is_sharded(optimizer) else optimizer


def full_state_dict(optimizer: torch.optim.Optimizer, d: Dist) -> dict | None:
    """The whole optimizer state on rank 0 (None elsewhere); a collective under ZeRO, call on every rank."""
    if _is_sharded(optimizer):
        optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if d.is_main else None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (momentum, moments) this rank holds."""
    total = 0
    for state in local_optimizer(optimizer).state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# collectives (no-ops for world size 1)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over ranks in place (on its device, the training backend) and return it."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if `flag` is true on any (a host-side gloo message)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier(group=_control_group)


@contextlib.contextmanager
def session(cfg: DistributedConfig, device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """init() ... shutdown(), also when training raises (after a barrier when it does not, so the ranks leave
    together). A session inside a process group that already exists (an outer session, or an embedding
    program's) leaves that group alone when it ends."""
    formed = not dist.is_initialized()
    d, device = init(cfg, device_name)
    try:
        yield d, device
    except BaseException:
        if formed:
            shutdown()
        raise
    if formed:
        barrier(d)  # leave together: a rank tearing gloo down while a peer still writes its summary can abort
        shutdown()
