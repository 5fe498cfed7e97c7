"""Time-to-target mode (MLPerf training methodology): evaluate every k epochs, stop at the target.

    largebatch train --recipe imagenet-resnet50-mlperf --data.dir /data/imagenet   # target 0.759, eval every 4
    largebatch train --recipe mnist-lenet --target 0.99 --eval-every 1
    largebatch train --task regression ... --target 0.05                            # a loss: reached at <= 0.05

With `--target A` (alias `--target-accuracy`) the trainer evaluates the full test split (distributed and exact)
every `--eval-every k` epochs, stops at the first evaluation whose value of the task's metric reaches A (top-1
accuracy >= A for classification, loss <= A for regression and language models) and reports the time to
train: from run_start (after initialisation: data, model, process group, compilation of nothing yet) to the
evaluation that reached A, evaluations included, as MLPerf scores it. Rank 0 writes an MLPerf log
(`mlperf.log` in the run directory, checked by `largebatch.mlperf.check`). MLPerf runs are uninterrupted;
a resumed run continues the clock from its checkpoint and writes its log to `mlperf-resumed-<step>.log`.

The log needs the `mlperf` extra (mlperf-logging). Without it the run still stops at the target and reports its time
to train, and says once that it writes no MLPerf log (and how to get one). Time-to-target is core, used on any run
(`--target 0.99` on MNIST); the log is a record for MLPerf submissions, so refusing the run would make an optional
by-product a requirement.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from largebatch.batch import RunPlan
from largebatch.config import ConfigError, RunConfig
from largebatch.tasks import Task

CLOSED_MODELS = {"resnet": ("resnet50",)}  # MLPerf closed division: the reference model only


class TimeToAccuracy:
    """The target check, the time-to-train clock and the MLPerf log of one run (disabled: all no-ops)."""

    def __init__(self, cfg: RunConfig, plan: RunPlan, task: Task, run_dir: Path, is_main: bool, n_eval: int,
                 bn_batch: int, start_step: int = 0, elapsed: float = 0.0) -> None:
        self.target, self.task = cfg.eval.target, task
        self.enabled = self.target > 0
        self.cfg, self.elapsed_before = cfg, elapsed
        self.reached_at: float | None = None  # epochs
        self.time_to_train: float | None = None
        name = "mlperf.log" if start_step == 0 else f"mlperf-resumed-{start_step}.log"
        o, s = cfg.optimizer, cfg.schedule
        closed = o.name in ("lars", "sgd") and cfg.model.name in CLOSED_MODELS.get(cfg.eval.mlperf_benchmark, ())
        self.log = _mlperf_log(run_dir / name, self.enabled and is_main, benchmark=cfg.eval.mlperf_benchmark,
                               division="closed" if closed else "open")
        self.log.init_start()
        self.log.hyperparameters(
            global_batch_size=plan.global_batch, opt_name=o.name, base_lr=plan.peak_lr, end_lr=plan.end_lr,
            decay_steps=plan.steps - plan.warmup_steps, warmup_epochs=plan.epoch(plan.warmup_steps),
            momentum=o.momentum, weight_decay=o.weight_decay, train_samples=plan.dataset_size, eval_samples=n_eval,
            seed=cfg.seed, model_bn_span=bn_batch, poly_power=s.power, epsilon=o.eps,
            gradient_accumulation_steps=plan.batch.accum_steps)
        self.log.init_stop()
        self.log.run_start()
        self._t0 = time.perf_counter()
        self._block = plan.epoch(start_step)
        self._open_block()

    def _open_block(self) -> None:
        count = self.cfg.eval.every_epochs or self.cfg.epochs
        self.log.block_start(self._block + 1, count)

    def elapsed(self) -> float:
        """Seconds since run_start, earlier segments of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def before_eval(self, epoch: float) -> None:
        self.log.block_stop(self._block + 1)
        self.log.eval_start(epoch)

    def after_eval(self, epoch: float, value: float, last: bool) -> bool:
        """Log the evaluation's value of the task's metric (MLPerf's `eval_accuracy` key is its quality metric,
        whatever it measures); True when the target is reached (the run stops and the clock with it)."""
        self.log.eval_accuracy(value, epoch)
        self.log.eval_stop(epoch)
        if self.enabled and self.task.reaches(value, self.target):
            self.reached_at, self.time_to_train = epoch, self.elapsed()
            self.log.run_stop(success=True)
            return True
        self._block = epoch
        if not last:
            self._open_block()
        return False

    def finish(self) -> dict:
        """Close the log (run_stop aborted if the target was not reached); the summary's TTA fields."""
        self.log.run_stop(success=self.reached_at is not None)
        self.log.close()
        if not self.enabled:
            return {}
        return {"target": self.target, "target_metric": f"test_{self.task.metric}",
                "target_reached": self.reached_at is not None,
                "epochs_to_target": self.reached_at, "time_to_train_seconds": self.time_to_train}


class _NoLog:
    """Stands in for an `MLPerfLog` that writes nothing (a run without a target, another rank, no mlperf-logging):
    every method is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _mlperf_log(path: Path, enabled: bool, **kw: Any) -> Any:
    """The run's `largebatch.mlperf.MLPerfLog` when `enabled` and mlperf-logging imports; else a `_NoLog`, with a
    one-line notice when a log was wanted (the module docstring says why the run goes on)."""
    if not enabled:
        return _NoLog()
    try:
        from largebatch.mlperf import MLPerfLog  # the 'mlperf' extra
    except ConfigError as e:
        print(f"[largebatch] time-to-target without an MLPerf log: {e}", flush=True)
        return _NoLog()
    return MLPerfLog(path, **kw)
