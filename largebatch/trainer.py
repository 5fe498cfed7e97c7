"""train(cfg): set up -> loop over steps (train_step) -> evaluate -> checkpoint -> summary.

    largebatch train --recipe mnist-lenet                       # one process
    largebatch train --resume runs/mnist-lenet-20261123-120000  # continue a stopped or killed run
    torchrun --nproc-per-node 2 -m largebatch train --recipe mnist-lenet-lars-8k   # data parallel (DDP)
    torchrun --nproc-per-node 2 --max-restarts 3 -m largebatch train --recipe ... --output.name r1
                                                                # a failed rank restarts the job from the checkpoint

The loop is indexed by the optimizer step: the LR, the batch and every periodic action are
functions of the step, so a run resumed from a checkpoint reproduces the uninterrupted one.
Under torchrun every rank runs this same loop on its share of each global batch (see
`largebatch.distributed`); rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from largebatch import batch as batching
from largebatch import checkpoint, distributed, monitor, noise
from largebatch.config import ConfigError, RunConfig, to_dict
from largebatch.data import Data, EvalSource, load_data
from largebatch.diagnostics import GradientProbe, NoiseScale, WeightDistance
from largebatch.distributed import Dist
from largebatch.metrics import MetricsLog, read_metrics, truncate_metrics
from largebatch.models import build_model, resolve
from largebatch.nn import convert_ghost_bn
from largebatch.optim import audit, model_param_groups, optimizer_factory
from largebatch.runtime import (environment, loss_dtype, peak_memory, resolve_precision, start_memory_tracking,
                                to_float64)
from largebatch.rundir import check_output_path, check_same_run, lock, run_dir_of
from largebatch.schedules import build_schedule, warmup_steps_of
from largebatch.tta import TimeToAccuracy

class Diverged(Exception):
    """The loss became NaN or infinite, exploded past eval.divergence_factor, or the give-up rule fired."""


@dataclass
class Setup:
    """Everything train() derives before its first step (printed once, recorded in env.json)."""

    run_dir: Path
    dist: Dist
    resume: bool
    device: torch.device
    autocast: torch.dtype | None
    data: Data
    model: nn.Module  # plain (not DDP-wrapped); on resume it holds the checkpoint's weights
    optimizer: torch.optim.Optimizer  # on resume it holds the checkpoint's state
    plan: batching.BatchPlan
    steps: int
    peak_lr: float
    w0: WeightDistance | None
    resumed: dict  # the checkpoint without weights and optimizer state (step, counters, RNG); {} for a new run


def setup(cfg: RunConfig, resume: bool, d: Dist, device: torch.device, held: contextlib.ExitStack) -> Setup:
    """Check everything, then lock and prepare the run directory: config, paths, data, model, checkpoint.

    Nothing is written before every check has passed, so bad input ends here with one ConfigError line
    and the run directory as it was. Rank 0 holds the directory's lock (`rundir.lock`) in `held` (the
    caller keeps it for the whole run); an existing directory is locked first, so a second process
    training it stops at once.
    """
    cfg.validate()
    factory = resolve(cfg.model.name)  # import the model's factory now: a name that does not import fails here
    distributed.check(cfg.distributed, d)
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
    state = checkpoint.read(ckpt, device) if resume else None
    if state is not None:
        check_same_run(run_dir, cfg, state.get("config"))  # a checkpoint without its config: config.json's
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    autocast = resolve_precision(cfg.precision.dtype, device)
    start_memory_tracking(device)

    data = load_data(cfg.data, device, cfg.model.channels_last, cfg.seed)
    for name, split in data.evals.items():
        if len(split) == 0:  # evaluate() would divide by zero after the whole run
            where = f" in {cfg.data.dir}" if cfg.data.dir else ""
            raise ConfigError(f"the {name} split of data.name = {cfg.data.name} has no examples, so the run could "
                              f"not be evaluated: check its {name} files{where}")
    n = len(data.train)
    steps = batching.total_steps(cfg.epochs, n, cfg.batch.global_batch)  # validates B <= N
    _check_warmup(cfg, steps, n)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, zero_init_residual=cfg.model.zero_init_residual, factory=factory)
    if cfg.model.ghost_batch:
        model = convert_ghost_bn(model, cfg.model.ghost_batch)
    model = model.to(device)
    if cfg.precision.dtype == "fp64":
        to_float64(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    w0 = WeightDistance(model) if cfg.diagnostics.weight_distance else None  # the seeded init, also on resume
    example, _ = data.train.example()
    per_example = batching.estimate_per_example_bytes(model, example, autocast)
    fixed = batching.model_state_bytes(model) + data.train.resident_bytes
    limit = cfg.batch.micro_batch_limit
    if limit == -1:
        limit = batching.CPU_MICRO_BATCH if device.type == "cpu" else 0
    plan = batching.plan_batch(cfg.batch.global_batch, d.world_size, cfg.batch.micro_batch, per_example, fixed,
                               int(cfg.batch.memory_cap_gib * batching.GiB), prefer_at_most=limit)
    if cfg.model.compile:  # after the memory probe, whose batch of 1 would compile a graph of its own
        model.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms
    peak_lr = batching.scale_lr(cfg.optimizer.base_lr, cfg.batch.global_batch, cfg.optimizer.reference_batch,
                                cfg.optimizer.scaling)
    make, groups = optimizer_factory(cfg.optimizer, peak_lr), model_param_groups(model, cfg.optimizer)
    sharded = cfg.distributed.shard_optimizer and d.enabled
    optimizer = distributed.shard_optimizer(make, groups, d) if sharded else make(groups)
    resumed = {}
    if state is not None:
        _restore(state, ckpt, model, optimizer, steps)
        resumed = {k: v for k, v in state.items() if k not in ("model", "optimizer", "config")}
    del state

    def prepare() -> None:  # rank 0, every check passed: lock a new directory, clean up, and only then write
        if not existed:
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(lock(run_dir))
            if checkpoint.latest(run_dir) is not None:  # another process made and trained it meanwhile
                raise _already_a_run(run_dir)
        stale = checkpoint.remove_stale_temporaries(run_dir)
        if stale:
            _say(f"[largebatch] removed {len(stale)} temporary file(s) of an interrupted write: "
                 f"{', '.join(p.name for p in stale)}")
        if not resume:
            truncate_metrics(run_dir, 0)  # a restarted job that failed before its first checkpoint

    _on_main(d, prepare)
    return Setup(run_dir, d, resume, device, autocast, data, model, optimizer, plan, steps, peak_lr, w0, resumed)


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


def _check_warmup(cfg: RunConfig, steps: int, n: int) -> None:
    """ConfigError when the warmup is longer than the run (the schedule would squeeze it into the run)."""
    s, B = cfg.schedule, cfg.batch.global_batch
    warmup = warmup_steps_of(s, n, B)
    if warmup > steps:
        given = (f"schedule.warmup_steps = {warmup}" if s.warmup_steps else
                 f"schedule.warmup_epochs = {s.warmup_epochs:g} is {warmup} steps at batch {B} of {n} examples")
        raise ConfigError(f"the warmup is longer than the run: {given}, but the run has {steps} steps "
                          f"(epochs = {cfg.epochs:g}); shorten the warmup (--schedule.warmup-epochs or "
                          f"--schedule.warmup-steps) or train more --epochs")


def _restore(state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Load the checkpoint's weights and optimizer state; ConfigError if they do not fit what was built."""
    fix = "delete it to restart the run, or restore a copy"
    if state["step"] > steps:
        raise ConfigError(f"{path} is at step {state['step']}, past the {steps} steps of this run; {fix}")
    try:
        model.load_state_dict(state["model"])  # strict: missing or unexpected keys and shape mismatches raise
        optimizer.load_state_dict(state["optimizer"])  # group and parameter counts must match
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"{path} does not fit the model and optimizer this config builds ({detail[:200]}); "
                          f"{fix}") from None
    local = distributed.local_optimizer(optimizer)
    for group in local.param_groups:
        for p in group["params"]:
            for key, v in local.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ConfigError(f"{path} does not fit the model: optimizer state {key!r} has shape "
                                      f"{tuple(v.shape)} for a parameter of shape {tuple(p.shape)}; {fix}")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
               plan: batching.BatchPlan, cfg: RunConfig, autocast: torch.dtype | None,
               probe: GradientProbe | None = None, step: int = 0, rank: int = 0) -> Tensor:
    """One optimizer step over this rank's batch, given as its `plan.accum_steps` micro-batches (x, y).

    Each micro-batch loss is its mean divided by the number of micro-batches, so the summed
    gradient equals the gradient of the mean loss over the rank's batch; DDP then averages over
    ranks, giving the gradient of the mean loss over the global batch. Returns this rank's mean
    loss as a device tensor (no host sync). A `probe` (measured steps only) reads the micro-batch
    gradients and the step's gradient before clipping; its result is in `probe.result`. Noise
    (`cfg.noise`, drawn from generators seeded by the seed, `step` and `rank`) perturbs labels and
    weights during the passes and the gradient after them.
    """
    nc, device = cfg.noise, next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad] if nc.weight_std or nc.gradient_eta else []
    labels = noise.generator(cfg.seed, step, "label", device, rank) if nc.label_prob else None
    weights = noise.generator(cfg.seed, step, "weight", device) if nc.weight_std else None  # same on every rank
    total = torch.zeros((), device=device)
    last = plan.accum_steps - 1
    with noise.weight_noise(params, nc.weight_std, weights):
        for i, (x, y) in enumerate(batches):
            with distributed.sync_context(model, sync=i == last):  # DDP all-reduces on the last one
                with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    logits = model(x)
                if labels is not None:
                    y = noise.flip_labels(y, nc.label_prob, logits.shape[1], labels)
                loss = F.cross_entropy(loss_dtype(logits), y, label_smoothing=cfg.label_smoothing)  # fp32 (fp64) loss
                (loss / plan.accum_steps).backward()
            total += loss.detach()
            if probe is not None:
                probe.after_micro_batch(i, last=i == last)
    if probe is not None:
        probe.result = probe.finish()
    if nc.gradient_eta:  # after the all-reduce, the same draw on every rank
        noise.add_gradient_noise_(params, noise.gradient_noise_std(step, nc.gradient_eta, nc.gradient_gamma),
                                  noise.generator(cfg.seed, step, "gradient", device))
    if cfg.grad_clip_norm:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / plan.accum_steps


@torch.no_grad()
def evaluate(model: nn.Module, split: EvalSource, batch_size: int, autocast: torch.dtype | None,
             d: Dist = Dist()) -> dict:
    """Mean cross-entropy and top-1 accuracy over the whole split, each rank evaluating its shard.

    Shards are padded to equal length and the padding is masked out (`eval_shard`), so the counts
    summed over ranks equal single-process evaluation exactly, for any split size and world size.
    """
    if not len(split):  # setup refuses an empty split before training; a direct call gets a clear error
        raise ConfigError("evaluate: the split has no examples")
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)  # exact below 2**53
    for x, y, mask in split.batches(d.rank, d.world_size, batch_size):
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = loss_dtype(model(x))
        per_example = F.cross_entropy(logits, y, reduction="none").double()
        loss += torch.where(mask, per_example, 0.0).sum()
        correct += ((logits.argmax(1) == y) & mask).sum()
    model.train()
    totals = distributed.all_reduce_sum(torch.stack([loss, correct]), d).tolist()  # sync point
    return {"loss": totals[0] / len(split), "accuracy": totals[1] / len(split)}


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "_StopRequest":
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train `cfg` to completion (or divergence, or a stop request) and return the summary.

    Under torchrun this joins the process group first (and leaves it at the end, also on error). The run
    directory stays locked until this returns or raises (`rundir.lock`; the OS releases it if the process dies).
    """
    with distributed.session(cfg.distributed, cfg.device) as (d, device), contextlib.ExitStack() as held:
        return _train(cfg, resume, d, device, held)


def _train(cfg: RunConfig, resume: bool, d: Dist, device: torch.device, held: contextlib.ExitStack) -> dict:
    t_start = time.perf_counter()
    s = setup(cfg, resume, d, device, held)
    say = _say if d.is_main else _quiet
    source, plan, n, B = s.data.train, s.plan, len(s.data.train), cfg.batch.global_batch
    log_every = cfg.output.log_every or max(1, batching.epochs_to_steps(0.1, n, B))
    dg = cfg.diagnostics
    model = distributed.wrap_model(s.model, d, cfg.distributed, measure_local_grad=dg.noise_scale)  # s.model: plain
    noise_scale = NoiseScale(dg.noise_ema)
    diag_every = dg.every_steps or log_every
    activation_noise = noise.ActivationNoise(s.model, cfg.noise.activation_std) if cfg.noise.activation_std else None
    optimizer, sharded = s.optimizer, cfg.distributed.shard_optimizer and d.enabled
    schedule = build_schedule(cfg.schedule, s.steps, n, B)

    if d.is_main:
        checkpoint.write_json(s.run_dir / "config.json", to_dict(cfg))
        checkpoint.write_json(s.run_dir / "env.json", environment(device, _precision(cfg, s.autocast), plan, s.peak_lr))
        report = audit(s.model, optimizer)
        checkpoint.atomic_write(s.run_dir / "optimizer_audit.txt", lambda f: f.write(report.encode()))
    say(f"[largebatch] run {s.run_dir}  device {device}  precision {_precision(cfg, s.autocast)}"
        + (f"  {d.world_size} ranks ({d.backend})" if d.enabled else ""))
    say(f"[largebatch] {plan.describe()}")
    say(f"[largebatch] peak LR {s.peak_lr:.6g} = base {cfg.optimizer.base_lr:g} at batch "
        f"{cfg.optimizer.reference_batch} scaled {cfg.optimizer.scaling}; {s.steps} steps = {cfg.epochs:g} epochs "
        f"x {n} / {B}")

    start, best, train_seconds, tta_seconds, first_loss = 0, 0.0, 0.0, 0.0, None
    if s.resume:  # setup restored the weights and the optimizer state
        state = s.resumed
        checkpoint.set_rng_state(state["rng"])
        start, best, train_seconds = state["step"], state["best_test_accuracy"], state["train_seconds"]
        tta_seconds = state.get("tta_seconds", 0.0)
        if "noise_scale" in state:
            noise_scale.load_state_dict(state["noise_scale"])
        first_loss = state.get("first_train_loss")
        if "first_train_loss" not in state:  # a checkpoint from before the divergence rule: read metrics.jsonl
            first_loss = distributed.broadcast(_first_train_loss(s.run_dir, start) if d.is_main else None, d)
        if d.is_main:
            truncate_metrics(s.run_dir, start)
        restarts = distributed.elastic_restart_count()
        say(f"[largebatch] resumed at step {start} (epoch {batching.epoch_at(start, n, B):.2f})"
            + (f" after torchrun restart {restarts}" if restarts else "")
            + (f"; checkpoint written by {state.get('world_size', 1)} rank(s)"
               if state.get("world_size", 1) != d.world_size else ""))

    bn_batch = (cfg.model.ghost_batch or plan.micro_batch) * cfg.distributed.bn_span
    tta = TimeToAccuracy(cfg, s.run_dir, d.is_main, n, len(s.data.evals["test"]), s.steps, plan.accum_steps,
                         bn_batch, s.peak_lr, start, tta_seconds)  # run_start: the clock starts here

    def save(step: int) -> None:  # every rank calls it: gathering a sharded optimizer state is a collective
        opt_state = distributed.full_state_dict(optimizer, d)
        if d.is_main:
            checkpoint.save(s.run_dir, {"step": step, "model": s.model.state_dict(), "optimizer": opt_state,
                                        "rng": checkpoint.rng_state(), "best_test_accuracy": best,
                                        "train_seconds": train_seconds, "world_size": d.world_size,
                                        "tta_seconds": tta.elapsed(), "first_train_loss": first_loss,
                                        "noise_scale": noise_scale.state_dict(), "config": to_dict(cfg)})
        distributed.barrier(d)

    def crossed(step: int, every: float) -> bool:  # did step `step` (1-based count) cross a multiple of `every` epochs?
        if not every:
            return False
        e0, e1 = (batching.epoch_at(k, n, B) / every for k in (step - 1, step))
        return math.floor(e1 + 1e-9) > math.floor(e0 + 1e-9)

    log = MetricsLog(s.run_dir, cfg.output.tensorboard, enabled=d.is_main)
    status, message, last_eval, done = "completed", "", {}, start
    running, count = torch.zeros((), device=device), 0
    seg_start = time.perf_counter()  # start of the current stretch of pure training time
    last_log_step, last_log_time = start, train_seconds
    bar = tqdm(total=s.steps, initial=start, disable=not (cfg.output.progress and d.is_main), unit="step",
               dynamic_ncols=True)
    try:
        with _StopRequest() as stop:
            for step in range(start, s.steps):
                lr = s.peak_lr * schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                probe = monitor.start_probe(model, s.model, plan, dg) if (step + 1) % diag_every == 0 else None
                if activation_noise is not None:
                    activation_noise.gen = noise.generator(cfg.seed, step, "activation", device, d.rank)
                batches = source.micro_batches(step, B, d.rank, d.world_size, plan.micro_batch)
                running += train_step(model, optimizer, batches, plan, cfg, s.autocast, probe, step, d.rank)
                count += 1
                done = step + 1
                bar.update(1)
                if probe is not None:
                    log.log({"step": done, "epoch": batching.epoch_at(done, n, B),
                             **monitor.measure(probe, model, s.model, noise_scale, s.w0, plan, d, dg)})
                if done % log_every == 0 or done == s.steps:
                    loss = distributed.all_reduce_sum(running, d).item() / (count * d.world_size)  # sync point
                    t = train_seconds + time.perf_counter() - seg_start
                    rate = (done - last_log_step) * B / max(t - last_log_time, 1e-9)
                    last_log_step, last_log_time = done, t
                    running.zero_()
                    count = 0
                    if not math.isfinite(loss):
                        raise Diverged(f"training loss is {loss} at step {done} (epoch "
                                       f"{batching.epoch_at(done, n, B):.2f}, lr {lr:.4g})")
                    log.log({"step": done, "epoch": batching.epoch_at(done, n, B), "lr": lr, "train_loss": loss,
                             "images_per_second": rate, "elapsed": time.perf_counter() - t_start,
                             **monitor.trust_ratio_stats(optimizer, d, sharded)})
                    first_loss = loss if first_loss is None else first_loss
                    _check_explosion("training loss", loss, first_loss, cfg.eval.divergence_factor, done, lr)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                is_last = done == s.steps
                stopping = distributed.any_rank(stop.requested, d) or done == cfg.checkpoint.stop_at_step
                do_eval = is_last or crossed(done, cfg.eval.every_epochs)
                do_save = is_last or stopping or crossed(done, cfg.checkpoint.every_epochs)
                if not (do_eval or do_save):
                    continue
                train_seconds += time.perf_counter() - seg_start  # eval and checkpoints are not training time
                distributed.sync_buffers(model, d)  # one set of BN statistics to evaluate and save
                reached = False
                if do_eval:
                    tta.before_eval(batching.epoch_at(done, n, B))
                    last_eval = _eval_all(s, cfg, done, n, log, bar, say)
                    if not math.isfinite(last_eval["test_loss"]):
                        raise Diverged(f"test loss is {last_eval['test_loss']} at step {done}")
                    for name in ("val", "test"):
                        if f"{name}_loss" in last_eval:
                            _check_explosion(f"{name} loss", last_eval[f"{name}_loss"], first_loss,
                                             cfg.eval.divergence_factor, done, lr)
                    if (last_eval["test_accuracy"] < cfg.eval.give_up_below
                            and last_eval["epoch"] >= cfg.eval.give_up_after_epochs - 1e-9):
                        raise Diverged(f"gave up: test accuracy {100 * last_eval['test_accuracy']:.2f}% < "
                                       f"{100 * cfg.eval.give_up_below:.2f}% (eval.give_up_below) at epoch "
                                       f"{last_eval['epoch']:.2f}, test loss {last_eval['test_loss']:.4g}")
                    best = max(best, last_eval["test_accuracy"])
                    reached = tta.after_eval(last_eval["epoch"], last_eval["test_accuracy"], is_last)
                if do_save or reached:
                    save(done)
                seg_start = time.perf_counter()
                if reached and not is_last:
                    message = (f"reached the target accuracy {100 * tta.target:.2f}% at epoch {last_eval['epoch']:.2f} "
                               f"in {tta.time_to_train:.1f} s (time to train, initialisation excluded)")
                    break
                if stopping and not is_last:
                    status = "stopped"
                    message = f"stopped at step {done} of {s.steps}; continue with --resume {s.run_dir}"
                    break
    except Diverged as e:
        train_seconds += time.perf_counter() - seg_start
        status, message = "diverged", str(e)
    finally:
        bar.close()
        log.close()
        tta_summary = tta.finish()

    if status == "completed" and not last_eval:  # resumed a finished run: evaluate the final weights
        last_eval = _eval_all(s, cfg, done, n, None, None, say)
        best = max(best, last_eval["test_accuracy"])
    summary = {
        "status": status,
        "message": message,
        "test_accuracy": last_eval.get("test_accuracy"),
        "test_loss": last_eval.get("test_loss"),
        "best_test_accuracy": best,
        **{k: v for k, v in last_eval.items() if k.startswith("val_")},
        "epochs": batching.epoch_at(done, n, B),
        "steps": done,
        "total_steps": s.steps,
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "train_images_per_second": done * B / train_seconds if train_seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory(device),
        "peak_lr": s.peak_lr,
        "global_batch": B,
        "train_examples": n,
        "world_size": d.world_size,
        "micro_batch": plan.micro_batch,
        "accum_steps": plan.accum_steps,
        "optimizer_state_bytes_per_rank": distributed.gather(distributed.state_bytes(optimizer), d),
        **tta_summary,
    }
    if d.is_main:
        checkpoint.write_json(s.run_dir / "summary.json", summary)
        _print_summary(summary, message)
    return summary


def _check_explosion(what: str, loss: float, first: float | None, factor: float, step: int, lr: float) -> None:
    """Diverged when `loss` exceeds `factor` (eval.divergence_factor, 0: off) x the first logged training loss."""
    if factor and first is not None and loss > factor * first:
        raise Diverged(f"{what} {loss:.4g} at step {step} (lr {lr:.4g}) exceeds eval.divergence_factor {factor:g} x "
                       f"the first logged training loss {first:.4g}: the loss exploded")


def _first_train_loss(run_dir: Path, step: int) -> float | None:
    """The first training loss logged up to `step` (None: none yet), for checkpoints that do not carry it."""
    return next((r["train_loss"] for r in read_metrics(run_dir)
                 if "train_loss" in r and r["step"] <= step and isinstance(r["train_loss"], (int, float))), None)


def _eval_all(s: Setup, cfg: RunConfig, step: int, n: int, log: MetricsLog | None, bar, say) -> dict:
    record = {"step": step, "epoch": batching.epoch_at(step, n, cfg.batch.global_batch)}
    for name in ("val", "test"):
        if name in s.data.evals:
            r = evaluate(s.model, s.data.evals[name], cfg.eval.batch_size, s.autocast, s.dist)
            record[f"{name}_loss"], record[f"{name}_accuracy"] = r["loss"], r["accuracy"]
    if log is not None:
        log.log(record)
    line = (f"[largebatch] epoch {record['epoch']:.2f} step {step}: test accuracy {100 * record['test_accuracy']:.2f}% "
            f"loss {record['test_loss']:.4f}")
    (bar.write if bar is not None and not bar.disable else say)(line)
    return record


def _precision(cfg: RunConfig, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype forward/backward compute in (printed and recorded in env.json)."""
    return torch.float64 if cfg.precision.dtype == "fp64" else autocast or torch.float32


def _say(line: str) -> None:
    print(line, flush=True)  # runs are often logged to files: show progress as it happens


def _quiet(line: str) -> None:  # ranks other than 0
    pass


def _print_summary(summary: dict, message: str) -> None:
    if message:
        _say(f"[largebatch] {summary['status']}: {message}")
    acc = summary["test_accuracy"]
    acc_text = f"{100 * acc:.2f}%" if acc is not None else "n/a"
    _say(f"[largebatch] {summary['status']}: test accuracy {acc_text} (best {100 * summary['best_test_accuracy']:.2f}%) "
          f"| {summary['epochs']:.2f} epochs, {summary['steps']} steps in {summary['wall_seconds']:.1f} s "
          f"| {summary['train_images_per_second']:.0f} train images/s "
          f"| peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
