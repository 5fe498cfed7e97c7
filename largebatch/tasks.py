"""Tasks: what a model's output is scored against, for training (the loss) and for evaluation (the metrics).

    largebatch train --task classification ...      cross-entropy (with label smoothing); loss, accuracy, top-5
    largebatch train --task regression ...          mean squared error; loss (MSE), RMSE
    largebatch train --task language-model ...      next-token cross-entropy; loss (nats/token), perplexity,
                                                    bits per token
    largebatch train --task mypkg.tasks:make_task   any callable returning a `Task`
    largebatch.train(cfg, task=MyTask())            or a `Task` object from Python

A task names its **primary metric** (`metric`, a key of `Task.metrics`) and its direction
(`higher_is_better`): time-to-target (`eval.target`), the give-up rule (`eval.give_up_worse_than`), the
best-so-far in the summary, and the study's regimes and report all read the metric through these two
fields, so a regression or language-model study is decided on its loss as a classification study is on
its accuracy.

Evaluation is exact under data parallelism: `eval_sums` returns per-batch float64 sums over the real
(unmasked) examples, the trainer all-reduces them, and `metrics` turns the totals into means, so any
number of ranks with padded shards gives the single-process numbers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from largebatch.config import TASKS, ConfigError
from largebatch.runtime import loss_dtype  # the loss of a bf16 forward in fp32 (fp64 stays fp64)


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """The float64 sum of `values` where `mask` is true (a padded example's NaN or inf cannot leak in)."""
    return torch.where(mask, values.double(), 0.0).sum()


class Task:
    """Base class of tasks. Subclass it for your own: set `name`, `metric`, `higher_is_better`, and
    implement `loss`, `eval_sums` and `metrics`.

    `loss(output, target)` is the mean training loss of a (micro-)batch, a scalar with a graph.
    `eval_sums(output, target, mask)` returns float64 scalar tensors summed over the examples where `mask`
    is true (mask: bool of shape [N], padding of the last evaluation shard is false).
    `metrics(sums)` turns the sums, added over batches and ranks (as Python floats), into named metrics;
    it must contain `loss` and `metric`.
    """

    name: str = "task"
    metric: str = "loss"
    higher_is_better: bool = False
    label_noise: bool = False  # whether noise.label_prob (random labels) applies: integer class targets only
    bounds: tuple[float, float] = (0.0, math.inf)  # the values the metric can take (targets are checked against it)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def eval_sums(self, output: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        """True when metric value `a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b

    def reaches(self, value: float, target: float) -> bool:
        """True when metric value `value` reaches `target` (>= for higher-is-better metrics, <= otherwise)."""
        return value >= target if self.higher_is_better else value <= target

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def format(self, value: float | None) -> str:
        """A value of the metric as people read it: accuracies in percent, other metrics as numbers."""
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" if "accuracy" in self.metric else f"{value:.4g}"

    def describe(self) -> str:
        return f"{self.name} ({self.metric}, {'higher' if self.higher_is_better else 'lower'} is better)"


class Classification(Task):
    """Cross-entropy over logits [N, C] and integer labels [N] (label smoothing in training only, Szegedy et
    al. 2016); evaluation: `loss` (unsmoothed cross-entropy), `accuracy` (top-1) and `top5_accuracy` (with
    five classes or more)."""

    name, metric, higher_is_better, label_noise, bounds = "classification", "accuracy", True, True, (0.0, 1.0)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(loss_dtype(output), target, label_smoothing=self.label_smoothing)

    def eval_sums(self, output: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        output = loss_dtype(output)
        sums = {"loss": _masked_sum(F.cross_entropy(output, target, reduction="none"), mask),
                "correct": _masked_sum(output.argmax(1) == target, mask), "count": _masked_sum(mask, mask)}
        if output.shape[1] >= 5:
            sums["correct5"] = _masked_sum((output.topk(5, dim=1).indices == target[:, None]).any(1), mask)
        return sums

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums["count"]
        out = {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}
        if "correct5" in sums:
            out["top5_accuracy"] = sums["correct5"] / n
        return out


class Regression(Task):
    """Mean squared error between outputs and float targets of the same number of elements per example (a
    target of shape [N] matches an output [N, 1]); evaluation: `loss` (MSE per element) and `rmse`."""

    name, metric, higher_is_better = "regression", "loss", False

    @staticmethod
    def _match(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        output = loss_dtype(output)
        if target.numel() != output.numel():
            raise ValueError(f"regression: the model's output {tuple(output.shape)} and the targets "
                             f"{tuple(target.shape)} differ in size; return one value per target")
        return output.reshape(len(output), -1), target.to(output.dtype).reshape(len(output), -1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(*self._match(output, target))

    def eval_sums(self, output: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        out, tgt = self._match(output, target)
        return {"sse": _masked_sum((out - tgt).double().square().sum(1), mask),
                "count": _masked_sum(mask, mask) * out.shape[1]}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        mse = sums["sse"] / sums["count"]
        return {"loss": mse, "rmse": math.sqrt(mse)}


class LanguageModel(Task):
    """Next-token cross-entropy over logits [N, T, V] and token ids [N, T] (`ignore_index` tokens excluded);
    evaluation per token: `loss` (nats), `perplexity` and `bits_per_token` (bits per character for a
    character-level model)."""

    name, metric, higher_is_better = "language-model", "loss", False

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(loss_dtype(output).flatten(0, -2), target.flatten(), ignore_index=self.ignore_index)

    def eval_sums(self, output: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        output = loss_dtype(output)
        per_token = F.cross_entropy(output.flatten(0, -2), target.flatten(), ignore_index=self.ignore_index,
                                    reduction="none").view(target.shape).double()
        real = (target != self.ignore_index) & mask.view(-1, *([1] * (target.dim() - 1)))
        return {"loss": _masked_sum(per_token, real), "count": _masked_sum(real, real)}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / sums["count"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2)}


BUILTIN: dict[str, Callable[..., Task]] = dict(zip(TASKS, (Classification, Regression, LanguageModel)))


def build_task(name: str, label_smoothing: float = 0.0, default: str = "classification") -> Task:
    """The task `name`: a built-in name, `auto` (the data's `default`), or `module:callable` returning a Task."""
    if name == "auto":
        name = default
    if name == "classification":
        return Classification(label_smoothing)
    if name in BUILTIN:
        if label_smoothing:
            raise ConfigError(f"label_smoothing = {label_smoothing:g} applies to classification only, but the task "
                              f"is {name}: drop --label-smoothing")
        return BUILTIN[name]()
    from largebatch.registry import import_path

    task = import_path(name, "task")()
    if not isinstance(task, Task):
        raise ConfigError(f"task = {name!r} returned {type(task).__name__}, not a largebatch.tasks.Task: return an "
                          f"instance of a Task subclass")
    return task
