"""Everything a run builds before its first step: checked input, data, task, model, run plan, optimizer, state.

`setup` does the work in the order that lets bad input fail before anything is written: the config and the
names it holds (model, data, task), the run directory and its checkpoint, the data (an empty split is an
error), the plan (`largebatch.batch.RunPlan`: batch split, steps, peak LR, warmup), the model and optimizer,
and, on resume, every stateful part loaded through the one `Checkpointer` (a checkpoint that does not fit is
one ConfigError line). Only then does rank 0 lock a new directory and clean up after an interrupted write.

A user's own parts come in through `Parts`: a model (factory or module), data (`largebatch.data.Splits`) and a
task (name or `largebatch.tasks.Task`), from `largebatch.train(cfg, model=..., data=..., task=...)`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from largebatch import batch as batching
from largebatch import checkpoint, distributed, extras
from largebatch.config import PYTHON, ConfigError, RunConfig, to_dict
from largebatch.data import Data, Splits, eval_shard_size, load_data, load_user_data
from largebatch.diagnostics import NoiseScale, WeightDistance
from largebatch.distributed import Dist
from largebatch.malloc import keep_freed_memory
from largebatch.metrics import truncate_metrics
from largebatch.models import build_model, resolve
from largebatch.nn import convert_ghost_bn
from largebatch.optim import model_param_groups, optimizer_factory
from largebatch.rundir import check_output_path, check_same_run, lock, run_dir_of
from largebatch.runtime import apply_threads, fit_threads, resolve_precision, start_memory_tracking, to_float64
from largebatch.schedules import build_schedule, warmup_steps_of
from largebatch.state import Checkpointer, TrainState, parts_of
from largebatch.tasks import Task, build_task
from largebatch.threads import ThreadPlan


@dataclass
class Parts:
    """A user's own model, data and task (None: the config's names)."""

    model: Callable[..., nn.Module] | nn.Module | None = None
    data: Splits | None = None
    task: str | Task | None = None


@dataclass
class Setup:
    """What `setup` built (printed once; the plan also in env.json)."""

    run_dir: Path
    resume: bool
    device: torch.device
    autocast: torch.dtype | None
    data: Data
    task: Task
    model: nn.Module  # plain (not DDP-wrapped)
    optimizer: torch.optim.Optimizer
    sharded: bool  # weight-update sharding (ZeRO) across ranks
    plan: batching.RunPlan
    state: TrainState
    noise_scale: NoiseScale
    w0: WeightDistance | None
    checkpointer: Checkpointer
    start: int  # the first step to run (the checkpoint's step on resume)
    threads: ThreadPlan  # torch's CPU threads and their derivation (printed once; also in env.json)


def recorded(cfg: RunConfig, parts: Parts) -> RunConfig:
    """`cfg` with the names of the user's parts, as config.json records them: an importable factory or Task class
    by its import path (so `--resume` and study workers re-import it), anything else as `python`."""
    cfg = copy.deepcopy(cfg)
    if parts.model is not None:
        cfg.model.name = _import_path_of(parts.model if not isinstance(parts.model, nn.Module) else None)
    if parts.data is not None:
        cfg.data.name = PYTHON
    if isinstance(parts.task, str):
        cfg.task = parts.task
    elif parts.task is not None:
        cfg.task = PYTHON
    cfg.validate()
    return cfg


def _import_path_of(obj: Any) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if obj is None or not module or module == "__main__" or "<" in qualname:
        return PYTHON
    return f"{module}:{qualname}"


def setup(cfg: RunConfig, resume: bool, d: Dist, device: torch.device, held: contextlib.ExitStack,
          parts: Parts = Parts()) -> Setup:
    """Check and build everything (see the module docstring); ConfigError before any write on bad input.

    Rank 0 holds the directory's lock (`rundir.lock`) in `held` (the caller keeps it for the whole run); an
    existing directory is locked first, so a second process training it stops at once.
    """
    cfg.validate()
    extras.check_run(cfg)  # a feature whose pip extra is missing stops here, before any write
    factory = _model_factory(cfg, parts)
    task = _task(cfg, parts, default=None)  # a name that does not import fails here (auto: after the data)
    distributed.check(cfg.distributed, d)
    run_dir, existed, resume, ckpt = _run_dir(cfg, resume, d, held)
    saved = checkpoint.read(ckpt, device) if resume else None
    if saved is not None:
        check_same_run(run_dir, cfg, saved.get("config"))  # a checkpoint without its config: config.json's
    autocast = resolve_precision(cfg.precision.dtype, device)
    malloc = keep_freed_memory() if device.type == "cpu" else ""  # before the data and the steps allocate
    start_memory_tracking(device)

    data = _data(cfg, parts, device)
    threads = apply_threads(cfg.threads, getattr(data.train, "num_workers", 0), malloc)  # workers known now
    task = task or _task(cfg, parts, default=data.task)
    _check_task(cfg, task)
    model = _model(cfg, factory, data, device)
    started = distributed.broadcast(_started_split(run_dir) if resume and d.is_main else None, d)  # one for all
    plan, op_flops = _plan(cfg, model, data, autocast, d, device, started)
    if op_flops is not None:  # CPU: a step, or an evaluation batch, too small to split over every thread
        eval_batch = min(cfg.eval.batch_size, max(eval_shard_size(len(s), d.world_size) for s in data.evals.values()))
        threads = fit_threads(threads, op_flops * plan.batch.micro_batch, op_flops * eval_batch)
    if cfg.model.compile:  # after the memory probe, whose batch of 1 would compile a graph of its own
        model.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms
    make, groups = optimizer_factory(cfg.optimizer, plan.peak_lr), model_param_groups(model, cfg.optimizer)
    sharded = cfg.distributed.shard_optimizer and d.enabled
    optimizer = distributed.shard_optimizer(make, groups, d) if sharded else make(groups)
    w0 = WeightDistance(model) if cfg.diagnostics.weight_distance else None  # the seeded init, also on resume
    state, noise_scale = TrainState(), NoiseScale(cfg.diagnostics.noise_ema)
    ckpt_parts = parts_of(model, optimizer, state, noise_scale, d)
    checkpointer = Checkpointer(run_dir, ckpt_parts, d, to_dict(cfg))
    start = checkpointer.load(saved, ckpt, plan.steps) if saved is not None else 0
    del saved
    _on_main(d, lambda: _prepare(run_dir, existed, resume, held))
    return Setup(run_dir, resume, device, autocast, data, task, model, optimizer, sharded, plan, state, noise_scale,
                 w0, checkpointer, start, threads)


def _run_dir(cfg: RunConfig, resume: bool, d: Dist, held: contextlib.ExitStack
             ) -> tuple[Path, bool, bool, Path | None]:
    """(run directory, whether it existed, resume, its checkpoint): an existing directory locked; a torchrun
    restart resumes; --resume without a checkpoint, or a new run into a trained directory, is a ConfigError."""
    run_dir = run_dir_of(cfg, d)
    _on_main(d, lambda: check_output_path(run_dir))
    existed = run_dir.is_dir()
    if existed:
        _on_main(d, lambda: held.enter_context(lock(run_dir)))
    ckpt = checkpoint.latest(run_dir)
    if not resume and ckpt and distributed.elastic_restart_count() > 0:
        resume = True  # torchrun restarted the job after a failure: continue from the last checkpoint
    if resume and not ckpt:
        raise ConfigError(f"--resume {run_dir}: no checkpoint there yet; start the run without --resume")
    if not resume and ckpt:
        raise _already_a_run(run_dir)
    return run_dir, existed, resume, ckpt


def _check_task(cfg: RunConfig, task: Task) -> None:
    """ConfigError for settings the task cannot take: label noise without class labels, a target or give-up
    value outside the values its metric takes."""
    if cfg.noise.label_prob and not task.label_noise:
        raise ConfigError(f"noise.label_prob = {cfg.noise.label_prob:g} flips class labels, and the task is "
                          f"{task.name}: drop --noise.label-prob")
    lo, hi = task.bounds
    for field, value in (("eval.target", cfg.eval.target), ("eval.give_up_worse_than", cfg.eval.give_up_worse_than)):
        if value and not lo <= value <= hi:
            raise ConfigError(f"{field} = {value:g} is invalid: the {task.name} task's metric {task.metric} lies in "
                              f"[{lo:g}, {hi:g}]")


def _model_factory(cfg: RunConfig, parts: Parts) -> Callable[..., nn.Module]:
    """The model's factory: the user's (a module is deep-copied: training never changes the caller's object) or
    the one `model.name` names, imported now so a name that does not import fails before any work."""
    if isinstance(parts.model, nn.Module):
        module = parts.model
        return lambda **kw: copy.deepcopy(module)
    if parts.model is not None:
        return parts.model
    if cfg.model.name == PYTHON:
        raise ConfigError("model.name = python: this run's model was given to largebatch.train() as a Python object; "
                          "resume it from Python with largebatch.train(cfg, model=..., resume=True)")
    return resolve(cfg.model.name)


def _task(cfg: RunConfig, parts: Parts, default: str | None) -> Task | None:
    """The task object: the user's, or `cfg.task` built (None while `auto` waits for the data's default)."""
    if isinstance(parts.task, Task):
        return parts.task
    if cfg.task == PYTHON:
        raise ConfigError("task = python: this run's task was given to largebatch.train() as a Python object; "
                          "resume it from Python with largebatch.train(cfg, task=..., resume=True)")
    if cfg.task == "auto" and default is None:
        return None
    return build_task(cfg.task, cfg.label_smoothing, default or "classification")


def _data(cfg: RunConfig, parts: Parts, device: torch.device) -> Data:
    """The data on `device`; ConfigError for a split without examples (evaluation would divide by zero)."""
    if parts.data is not None:
        data = load_user_data(parts.data, cfg.data, device, cfg.model.channels_last, cfg.seed)
    else:
        data = load_data(cfg.data, device, cfg.model.channels_last, cfg.seed)
    for name, split in data.evals.items():
        if len(split) == 0:
            where = f" in {cfg.data.dir}" if cfg.data.dir else ""
            raise ConfigError(f"the {name} split of data.name = {cfg.data.name} has no examples, so the run could "
                              f"not be evaluated: check its {name} files{where}")
    return data


def _model(cfg: RunConfig, factory: Callable[..., nn.Module], data: Data, device: torch.device) -> nn.Module:
    """The model, seeded (the same initial weights on every rank), on `device` in its precision and layout."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, zero_init_residual=cfg.model.zero_init_residual, factory=factory,
                        **data.keywords)
    if cfg.model.ghost_batch:
        model = convert_ghost_bn(model, cfg.model.ghost_batch)
    model = model.to(device)
    if cfg.precision.dtype == "fp64":
        to_float64(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _started_split(run_dir: Path) -> tuple[int, int] | None:
    """(world size, micro-batch) a resumed run last ran with, from its env.json (None where it has none)."""
    try:
        env = json.loads((run_dir / "env.json").read_text())
        return int(env["world_size"]), int(env["micro_batch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _plan(cfg: RunConfig, model: nn.Module, data: Data, autocast: torch.dtype | None, d: Dist,
          device: torch.device, started: tuple[int, int] | None = None) -> tuple[batching.RunPlan, float | None]:
    """The run plan: steps, warmup (refused when longer than the run), batch split from the memory probe, LR; and,
    on CPU, the FLOPs of an average matmul/convolution of the forward per example (`batching.probe_forward`; None:
    none counted).

    A resumed run whose micro-batch is derived keeps the one it ran with (`started`: world size, micro-batch) on
    the same world size, where it still fits the memory cap: a default bound changed since (`CPU_MICRO_BATCH`)
    would otherwise sum its gradients in other groups from the resume on."""
    n, B = len(data.train), cfg.batch.global_batch
    steps = batching.total_steps(cfg.epochs, n, B)  # validates B <= N
    warmup = warmup_steps_of(cfg.schedule, n, B)
    if warmup > steps:
        s = cfg.schedule
        given = (f"schedule.warmup_steps = {warmup}" if s.warmup_steps else
                 f"schedule.warmup_epochs = {s.warmup_epochs:g} is {warmup} steps at batch {B} of {n} examples")
        raise ConfigError(f"the warmup is longer than the run: {given}, but the run has {steps} steps "
                          f"(epochs = {cfg.epochs:g}); shorten the warmup (--schedule.warmup-epochs or "
                          f"--schedule.warmup-steps) or train more --epochs")
    example, _ = data.train.example()
    per_example, op_flops = batching.probe_forward(model, example, autocast, count_ops=device.type == "cpu")
    fixed = batching.model_state_bytes(model) + data.train.resident_bytes
    limit = cfg.batch.micro_batch_limit
    if limit == -1:
        limit = batching.cpu_micro_batch(autocast) if device.type == "cpu" else 0
    cap, split = int(cfg.batch.memory_cap_gib * batching.GiB), None
    if started is not None and not cfg.batch.micro_batch and started[0] == d.world_size:
        with contextlib.suppress(ConfigError):  # no longer divides or fits: derived anew below
            split = batching.plan_batch(B, d.world_size, started[1], per_example, fixed, cap)
    if split is None:
        split = batching.plan_batch(B, d.world_size, cfg.batch.micro_batch, per_example, fixed, cap,
                                    prefer_at_most=limit)
    peak_lr = batching.scale_lr(cfg.optimizer.base_lr, B, cfg.optimizer.reference_batch, cfg.optimizer.scaling)
    plan = batching.RunPlan(split, n, steps, peak_lr, warmup, build_schedule(cfg.schedule, steps, n, B))
    return plan, op_flops


def _prepare(run_dir: Path, existed: bool, resume: bool, held: contextlib.ExitStack) -> None:
    """Rank 0, every check passed: lock a new directory, clean up, and only then write."""
    if not existed:
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock(run_dir))
        if checkpoint.latest(run_dir) is not None:  # another process made and trained it meanwhile
            raise _already_a_run(run_dir)
    stale = checkpoint.remove_stale_temporaries(run_dir)
    if stale:
        print(f"[largebatch] removed {len(stale)} temporary file(s) of an interrupted write: "
              f"{', '.join(p.name for p in stale)}", flush=True)
    if not resume:
        truncate_metrics(run_dir, 0)  # a restarted job that failed before its first checkpoint


def _on_main(d: Dist, check: Callable[[], object]) -> None:
    """Run `check` on rank 0 only; its error is raised on every rank (the others would wait for rank 0 forever).

    A collective (a broadcast), so every rank calls it at the same point.
    """
    error = None
    if d.is_main:
        try:
            check()
        except (ConfigError, OSError) as e:
            error = str(e)
    error = distributed.broadcast(error, d)
    if error is not None:
        raise ConfigError(error)


def _already_a_run(run_dir: Path) -> ConfigError:
    return ConfigError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another "
                       f"--output.name")
