"""Evaluation: exact, distributed metrics of a task over whole splits, and the rules evaluations decide.

`evaluate` runs one split: each rank its padded shard (`largebatch.data.eval_shard`), the task's float64 sums
all-reduced, so the result equals single-process evaluation for any world size. The `Evaluator` evaluates
every split of a run (`val` when there is one, then `test`), logs the record, keeps the best value of the
task's metric, ends the run as `Diverged` when a loss is not finite or has exploded, or when the give-up
rule fires (`eval.give_up_worse_than` from `eval.give_up_after_epochs`), tells time-to-target
(`largebatch.tta`) about the test metric, and asks the caller's `on_eval` hook whether to stop here (a study's
pruner, `largebatch.study.runs`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from largebatch import distributed
from largebatch.batch import RunPlan
from largebatch.config import ConfigError, EvalConfig
from largebatch.data import EvalSource
from largebatch.distributed import Dist
from largebatch.metrics import MetricsLog
from largebatch.runtime import threads_while
from largebatch.state import Diverged, TrainState, check_explosion
from largebatch.tasks import Task
from largebatch.tta import TimeToAccuracy

OnEval = Callable[[int, float, dict], Any]
"""`on_eval(step, epoch, metrics)`, called after each evaluation with the logged record (`step`, `epoch`,
`test_*`, `val_*`); a truthy answer asks the run to stop there (a string is quoted as the reason)."""


@torch.no_grad()
def evaluate(model: nn.Module, split: EvalSource, task: Task, batch_size: int, autocast: torch.dtype | None,
             d: Dist = Dist()) -> dict[str, float]:
    """The task's metrics (`Task.metrics`) over the whole split, each rank evaluating its shard.

    Shards are padded to equal length and the padding is masked out (`eval_shard`), so the float64 sums
    added over ranks equal single-process evaluation exactly, for any split size and world size.
    """
    if not len(split):  # setup refuses an empty split before training; a direct call gets a clear error
        raise ConfigError("evaluate: the split has no examples")
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for x, y, mask in split.batches(d.rank, d.world_size, batch_size):
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            output = model(x)
        for k, v in task.eval_sums(output, y, mask).items():
            sums[k] = sums[k] + v if k in sums else v
    model.train()
    names = sorted(sums)
    totals = distributed.all_reduce_sum(torch.stack([sums[k] for k in names]), d).tolist()  # sync point
    return task.metrics(dict(zip(names, totals)))


class Evaluator:
    """Evaluates a run's splits at a step and applies the rules of the module docstring."""

    def __init__(self, model: nn.Module, splits: dict[str, EvalSource], task: Task, cfg: EvalConfig,
                 autocast: torch.dtype | None, d: Dist, plan: RunPlan, state: TrainState, tta: TimeToAccuracy,
                 say: Callable[[str], None], on_eval: OnEval | None = None, threads: int | None = None) -> None:
        self.model, self.splits, self.task, self.cfg, self.autocast = model, splits, task, cfg, autocast
        self.d, self.plan, self.state, self.tta, self.say, self.on_eval = d, plan, state, tta, say, on_eval
        self.threads = threads
        """torch's CPU threads while evaluating (`ThreadPlan.eval_threads`; None: the training step's)."""
        self.last: dict = {}
        self.halt = ""
        """Why `on_eval` asked the run to stop at the last evaluation ("": it did not)."""

    def __call__(self, step: int, last: bool, log: MetricsLog) -> bool:
        """Evaluate at `step`, log it and ask `on_eval` (`halt`); True when time-to-target is reached. Raises
        Diverged by the rules (before `on_eval` is asked)."""
        epoch = self.plan.epoch(step)
        self.tta.before_eval(epoch)
        record = self.measure(step)
        log.log(record)
        self._check(record, step)
        self.halt = self._ask(record)
        return self.tta.after_eval(epoch, record[f"test_{self.task.metric}"], last)

    def _ask(self, record: dict) -> str:
        """`on_eval`'s answer as a reason to stop ("": go on), the same on every rank (each asks its own hook
        with the same all-reduced metrics; one asking stops them all)."""
        if self.on_eval is None:
            return ""
        answer = self.on_eval(record["step"], record["epoch"], dict(record))
        reason = (answer if isinstance(answer, str) else "on_eval asked to stop") if answer else ""
        return (reason or "another rank's on_eval asked to stop") if distributed.any_rank(bool(reason), self.d) else ""

    def measure(self, step: int) -> dict:
        """Evaluate every split at `step` (val, then test), print it and keep the best test value of the metric."""
        record = {"step": step, "epoch": self.plan.epoch(step)}
        with threads_while(self.threads):
            for name in ("val", "test"):
                if name in self.splits:
                    r = evaluate(self.model, self.splits[name], self.task, self.cfg.batch_size, self.autocast, self.d)
                    record.update({f"{name}_{k}": v for k, v in r.items()})
        value = record[f"test_{self.task.metric}"]
        self.say(f"[largebatch] epoch {record['epoch']:.2f} step {step}: test {self.task.metric} "
                 f"{self.task.format(value)}" + ("" if self.task.metric == "loss" else
                                                  f" loss {record['test_loss']:.4f}"))
        if math.isfinite(value) and (self.state.best is None or self.task.better(value, self.state.best)):
            self.state.best = value
        self.last = record
        return record

    def _check(self, record: dict, step: int) -> None:
        for name in ("val", "test"):
            loss = record.get(f"{name}_loss")
            if loss is None:
                continue
            if not math.isfinite(loss):
                raise Diverged(f"{name} loss is {loss} at step {step}")
            check_explosion(f"{name} loss", loss, self.state.first_train_loss, self.cfg.divergence_factor, step,
                            self.plan.lr(step - 1))
        value, limit, epoch = record[f"test_{self.task.metric}"], self.cfg.give_up_worse_than, record["epoch"]
        if limit and epoch >= self.cfg.give_up_after_epochs - 1e-9 and self.task.better(limit, value):
            raise Diverged(f"gave up: test {self.task.metric} {self.task.format(value)} is worse than "
                           f"{self.task.format(limit)} (eval.give_up_worse_than) at epoch {epoch:.2f}, "
                           f"test loss {record['test_loss']:.4g}")
