"""train(cfg): set up -> loop over steps (train_step) -> evaluate -> checkpoint -> summary.

    largebatch train --recipe mnist-lenet                       # one process
    largebatch train --resume runs/mnist-lenet-20261123-120000  # continue a stopped or killed run
    torchrun --nproc-per-node 2 -m largebatch train --recipe mnist-lenet-lars-8k   # data parallel (DDP)
    torchrun --nproc-per-node 2 --max-restarts 3 -m largebatch train --recipe ... --output.name r1
                                                                # a failed rank restarts the job from the checkpoint

From Python, with your own model, data and task (see `largebatch.data.Splits`, `largebatch.tasks`):

    summary = largebatch.train(cfg, model=MyNet, data=Splits(train=(x, y), test=(x_test, y_test)))
    summary = largebatch.train(cfg, on_eval=lambda step, epoch, m: m["test_accuracy"] < 0.5 and epoch >= 5)
                                            # stop a hopeless run after its evaluation (checkpoint written)

The loop is indexed by the optimizer step: the LR, the batch and every periodic action are functions of the
step, so a run resumed from a checkpoint reproduces the uninterrupted one. Its parts: `largebatch.build.setup`
(everything derived before the first step, the `RunPlan` among it), `train_step`, `largebatch.monitor.StepLog`
(training loss, images/s, diagnostics, divergence), `largebatch.evaluator.Evaluator` (metrics, give-up rule,
time-to-target) and `largebatch.state.Checkpointer` (one dict of stateful parts). Under torchrun every rank runs
this same loop on its share of each global batch (see `largebatch.distributed`); rank 0 alone writes the run
directory.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from largebatch import checkpoint, distributed, noise, transforms
from largebatch.build import Parts, Setup, recorded, setup
from largebatch.config import RunConfig, to_dict
from largebatch.data import Splits
from largebatch.evaluator import Evaluator, OnEval
from largebatch.metrics import MetricsLog, ProgressBar, read_metrics, truncate_metrics
from largebatch.monitor import StepLog
from largebatch.optim import audit
from largebatch.runtime import environment, peak_memory
from largebatch.state import Diverged
from largebatch.tasks import Task
from largebatch.tta import TimeToAccuracy

Relabel = Callable[[Tensor, Tensor], Tensor]


def train(cfg: RunConfig, resume: bool = False, *, model: Callable[..., nn.Module] | nn.Module | None = None,
          data: Splits | None = None, task: str | Task | None = None, on_eval: OnEval | None = None) -> dict:
    """Train `cfg` to completion (or divergence, or a stop request) and return the summary.

    `model`, `data` and `task` replace the config's `model.name`, `data.name` and `task` with your own: a model
    factory (called with the data's keywords, `largebatch.models.registry`) or an nn.Module (copied), a
    `largebatch.data.Splits`, a task name or `largebatch.tasks.Task`. config.json records an importable factory
    by its import path and anything else as `python` (resume such a run by passing the same objects again).
    `on_eval(step, epoch, metrics)` is called after every evaluation (`largebatch.evaluator.OnEval`); a truthy
    answer before the last step ends the run there as a stop request does: checkpoint, summary status "stopped"
    (resumable), its message quoting the answer.
    Under torchrun this joins the process group first (and leaves it at the end, also on error). The run
    directory stays locked until this returns or raises (`rundir.lock`; the OS releases it if the process dies).
    """
    t_start = time.perf_counter()
    parts = Parts(model, data, task)
    cfg = recorded(cfg, parts)
    with distributed.session(cfg.distributed, cfg.device) as (d, device), contextlib.ExitStack() as held:
        s = setup(cfg, resume, d, device, held, parts)
        return _loop(cfg, s, d, t_start, on_eval)


@dataclass
class Loop:
    """The loop's parts, built once from the setup: the (DDP-wrapped) model, the per-step pass noise, the gradient
    transforms, the metrics file and progress bar, time-to-target, the evaluator and the step log."""

    model: nn.Module
    passes: noise.PassNoise
    transform: transforms.GradientTransform
    log: MetricsLog
    bar: ProgressBar
    tta: TimeToAccuracy
    evaluator: Evaluator
    steplog: StepLog


def _parts(cfg: RunConfig, s: Setup, d: distributed.Dist, say: Callable[[str], None], on_eval: OnEval | None
           ) -> Loop:
    plan, n = s.plan, cfg.noise
    model = distributed.wrap_model(s.model, d, cfg.distributed, measure_local_grad=cfg.diagnostics.noise_scale)
    passes = noise.PassNoise(s.model, cfg.seed, d.rank, n.weight_std, n.activation_std, n.label_prob)
    transform = transforms.from_config(n.gradient_eta, n.gradient_gamma, cfg.grad_clip_norm, cfg.seed)
    log = MetricsLog(s.run_dir, cfg.output.tensorboard, enabled=d.is_main)
    bar = ProgressBar(total=plan.steps, initial=s.start, disable=not (cfg.output.progress and d.is_main), unit="step",
               dynamic_ncols=True)
    bn_batch = (cfg.model.ghost_batch or plan.batch.micro_batch) * cfg.distributed.bn_span
    tta = TimeToAccuracy(cfg, plan, s.task, s.run_dir, d.is_main, len(s.data.evals["test"]), bn_batch, s.start,
                         s.state.tta_seconds)  # run_start: the clock starts here
    evaluator = Evaluator(s.model, s.data.evals, s.task, cfg.eval, s.autocast, d, plan, s.state, tta,
                          bar.write if not bar.disable else say, on_eval, s.threads.eval_threads)
    steplog = StepLog(model, s.model, s.optimizer, plan, log, s.state, d, cfg.diagnostics, cfg.output.log_every,
                      cfg.eval.divergence_factor, s.noise_scale, s.w0, s.sharded, bar, s.start)
    return Loop(model, passes, transform, log, bar, tta, evaluator, steplog)


def _loop(cfg: RunConfig, s: Setup, d: distributed.Dist, t_start: float, on_eval: OnEval | None) -> dict:
    plan, say = s.plan, (_say if d.is_main else _quiet)
    _start(cfg, s, d, say)
    p = _parts(cfg, s, d, say, on_eval)
    status, message, done = "completed", "", s.start
    try:
        with _StopRequest() as stop:
            for step in range(s.start, plan.steps):
                s.state.start_clock()
                lr = plan.lr(step)
                for group in s.optimizer.param_groups:
                    group["lr"] = lr
                probe = p.steplog.probe(step)
                with p.passes.step(step) as relabel:
                    batches = s.data.train.micro_batches(step, plan.global_batch, d.rank, d.world_size,
                                                         plan.batch.micro_batch)
                    loss = train_step(p.model, s.optimizer, batches, plan.batch.accum_steps, s.task.loss,
                                      s.autocast, p.transform, step, probe, relabel)
                done = step + 1
                p.steplog.after_step(done, lr, loss, probe)
                is_last = done == plan.steps
                stopping = distributed.any_rank(stop.requested, d) or done == cfg.checkpoint.stop_at_step
                do_eval = is_last or plan.crossed(done, cfg.eval.every_epochs)
                do_save = is_last or stopping or plan.crossed(done, cfg.checkpoint.every_epochs)
                if not (do_eval or do_save):
                    continue
                s.state.stop_clock()  # evaluation and checkpoints are not training time
                distributed.sync_buffers(p.model, d)  # one set of BN statistics to evaluate and save
                reached = do_eval and p.evaluator(done, is_last, p.log)
                halt = do_eval and not is_last and p.evaluator.halt  # on_eval asked to stop here
                if do_save or reached or halt:
                    s.state.tta_seconds = p.tta.elapsed()
                    s.checkpointer.save(done)
                if reached and not is_last:
                    message = (f"reached the target {s.task.metric} {p.tta.target:g} at epoch {plan.epoch(done):.2f} "
                               f"in {p.tta.time_to_train:.1f} s (time to train, initialisation excluded)")
                    break
                if (stopping or halt) and not is_last:
                    why = f" by on_eval ({halt})" if halt else ""
                    status, message = "stopped", f"stopped at step {done} of {plan.steps}{why}; continue with " \
                                                 f"--resume {s.run_dir}"
                    break
    except Diverged as e:
        status, message = "diverged", str(e)
    finally:
        s.state.stop_clock()
        p.bar.close()
        p.log.close()
        tta_summary = p.tta.finish()
    if status == "completed" and not p.evaluator.last:  # resumed a finished run: evaluate the final weights
        p.evaluator.measure(done)
    summary = _summary(s, d, status, message, done, p.evaluator.last, time.perf_counter() - t_start, tta_summary)
    if d.is_main:
        checkpoint.write_json(s.run_dir / "summary.json", summary)
        _print_summary(summary, s.task, message)
    return summary


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
               accum_steps: int, loss_fn: Callable[[Tensor, Tensor], Tensor], autocast: torch.dtype | None,
               transform: transforms.GradientTransform = transforms.identity, step: int = 0, probe=None,
               relabel: Relabel | None = None) -> Tensor:
    """One optimizer step over this rank's batch, given as its `accum_steps` micro-batches (inputs, targets).

    Each micro-batch loss (`loss_fn(output, targets)`, its mean) is divided by the number of micro-batches, so
    the summed gradient is the gradient of the mean loss over the rank's batch; DDP then averages over ranks,
    giving the gradient of the mean loss over the global batch. `transform` (`largebatch.transforms`: noise,
    clipping) edits that gradient before the optimizer step. Returns this rank's mean loss as a device tensor
    (no host sync). A `probe` (measured steps only) reads the micro-batch gradients and the step's gradient
    before the transforms; `relabel` (label noise) may replace the targets given the output.
    """
    total = None
    last = accum_steps - 1
    for i, (x, y) in enumerate(batches):
        with distributed.sync_context(model, sync=i == last):  # DDP all-reduces on the last one
            with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                output = model(x)
            loss = loss_fn(output, relabel(y, output) if relabel is not None else y)  # fp32 (fp64) loss
            (loss / accum_steps).backward()
        total = loss.detach() if total is None else total + loss.detach()
        if probe is not None:
            probe.after_micro_batch(i, last=i == last)
    if probe is not None:
        probe.result = probe.finish()
    if transform is not transforms.identity:  # noise or clipping configured: not on the plain step's hot path
        transform([p for p in model.parameters() if p.requires_grad], step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum_steps


def _start(cfg: RunConfig, s: Setup, d: distributed.Dist, say: Callable[[str], None]) -> None:
    """Write config.json, env.json and the optimizer audit (rank 0); print the plan; on resume, truncate the
    metrics after the checkpoint and recover the divergence rule's reference loss if the checkpoint lacks it."""
    precision = torch.float64 if cfg.precision.dtype == "fp64" else s.autocast or torch.float32
    if d.is_main:
        checkpoint.write_json(s.run_dir / "config.json", to_dict(cfg))
        checkpoint.write_json(s.run_dir / "env.json", environment(s.device, precision, s.plan, s.threads))
        report = audit(s.model, s.optimizer)
        checkpoint.atomic_write(s.run_dir / "optimizer_audit.txt", lambda f: f.write(report.encode()))
        for name, text in s.data.files.items():  # e.g. a text corpus's vocabulary
            checkpoint.atomic_write(s.run_dir / name, lambda f, text=text: f.write(text.encode()))
    say(f"[largebatch] run {s.run_dir}  device {s.device}  precision {precision}  task {s.task.describe()}"
        + (f"  {d.world_size} ranks ({d.backend})" if d.enabled else ""))
    o = cfg.optimizer
    for line in [*s.plan.describe(o.base_lr, o.reference_batch, o.scaling, cfg.epochs), s.threads.describe()]:
        say(f"[largebatch] {line}")
    if not s.resume:
        return
    if s.state.first_train_loss is None and s.start:  # a checkpoint from before the divergence rule
        s.state.first_train_loss = distributed.broadcast(_first_train_loss(s.run_dir, s.start) if d.is_main
                                                         else None, d)
    if d.is_main:
        truncate_metrics(s.run_dir, s.start)
    restarts = distributed.elastic_restart_count()
    say(f"[largebatch] resumed at step {s.start} (epoch {s.plan.epoch(s.start):.2f})"
        + (f" after torchrun restart {restarts}" if restarts else ""))


def _first_train_loss(run_dir: Path, step: int) -> float | None:
    """The first training loss logged up to `step` (None: none yet), for checkpoints that do not carry it."""
    return next((r["train_loss"] for r in read_metrics(run_dir)
                 if "train_loss" in r and r["step"] <= step and isinstance(r["train_loss"], (int, float))), None)


def _summary(s: Setup, d: distributed.Dist, status: str, message: str, done: int, last: dict, wall: float,
             tta: dict) -> dict:
    """summary.json: the outcome, the task's final metrics (test_* and val_*), the best value of its metric,
    time and throughput, and the run plan's numbers."""
    plan, task, seconds = s.plan, s.task, s.state.train_seconds
    block = s.data.keywords.get("block_size")  # sequences: the batch counts sequences; report tokens too
    tokens = {} if not block else {
        "tokens_per_example": block, "global_batch_tokens": plan.global_batch * block,
        "train_tokens": done * plan.global_batch * block,
        "train_tokens_per_second": done * plan.global_batch * block / seconds if seconds > 0 else 0.0}
    return {
        "status": status, "message": message,
        "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
        **{k: v for k, v in last.items() if k.startswith(("test_", "val_"))},
        f"best_test_{task.metric}": s.state.best,
        "epochs": plan.epoch(done), "steps": done, "total_steps": plan.steps,
        "wall_seconds": wall, "train_seconds": seconds,
        "train_images_per_second": done * plan.global_batch / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory(s.device), "peak_lr": plan.peak_lr, "global_batch": plan.global_batch,
        "train_examples": plan.dataset_size, "world_size": d.world_size, "micro_batch": plan.batch.micro_batch,
        "accum_steps": plan.batch.accum_steps,
        "optimizer_state_bytes_per_rank": distributed.gather(distributed.state_bytes(s.optimizer), d),
        **tokens,
        **tta,
    }


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


def _say(line: str) -> None:
    print(line, flush=True)  # runs are often logged to files: show progress as it happens


def _quiet(line: str) -> None:  # ranks other than 0
    pass


def _print_summary(summary: dict, task: Task, message: str) -> None:
    if message:
        _say(f"[largebatch] {summary['status']}: {message}")
    value, best = summary.get(f"test_{task.metric}"), summary[f"best_test_{task.metric}"]
    _say(f"[largebatch] {summary['status']}: test {task.metric} {task.format(value)} (best {task.format(best)}) "
         f"| {summary['epochs']:.2f} epochs, {summary['steps']} steps in {summary['wall_seconds']:.1f} s "
         f"| {summary['train_images_per_second']:.0f} train examples/s "
         f"| peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
