"""The plan checked against published times to train: predicted, published, ratio (`largebatch plan --check-published`).

Each row is a published run: its model, machine (a built-in profile, datasheet values only), chips, global batch,
epochs and time. The prediction uses exactly those inputs and nothing fitted to the row; the epochs are the run's own
(the paper's, or the epoch the MLPerf log converged at) or, where the run does not state them, the MLPerf reference
convergence point at its batch (`convergence.mlperf_resnet`). MLPerf times include the evaluations (every 4 epochs
over the 50,000 validation images); the You et al. times are quoted for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from largebatch.plan.convergence import fixed, mlperf_resnet
from largebatch.plan.hardware import load_profile
from largebatch.plan.planner import Workload, point
from largebatch.plan.workload import DATASETS, model_flops

IMAGENET = DATASETS["imagenet"]


@dataclass(frozen=True)
class Published:
    """One published run (see the module docstring); epochs None: the MLPerf reference convergence point."""

    label: str
    source: str
    model: str
    profile: str
    chips: int
    batch: int
    epochs: float | None
    seconds: float
    eval_every_epochs: float = 0.0


PUBLISHED: tuple[Published, ...] = (
    Published("ResNet-50, 2,048 Xeon Phi 7250", "You et al. 2018, ImageNet training in minutes (ICPP), abstract",
              "resnet50-v1", "knl-7250", 2048, 32768, 90, 20 * 60),
    Published("AlexNet-BN, 2,048 Xeon Platinum 8160", "You et al. 2018, ImageNet training in minutes (ICPP), abstract",
              "alexnet-bn", "skx-8160", 2048, 32768, 100, 11 * 60),
    Published("ResNet-50, TPU-v3 2,048 cores, 72.8 ep", "Kumar et al. 2019, Scale MLPerf-0.6 models on TPU-v3 pods",
              "resnet50", "tpu-v3", 1024, 32768, 72.8, 76.9, 4),
    Published("ResNet-50, TPU-v3 2,048 cores, 70.6 ep", "Kumar et al. 2019, Scale MLPerf-0.6 models on TPU-v3 pods",
              "resnet50", "tpu-v3", 1024, 32768, 70.6, 72.4, 4),
    Published("ResNet-50, TPU-v3 2,048 cores, 64 ep", "Kumar et al. 2019, Scale MLPerf-0.6 models on TPU-v3 pods",
              "resnet50", "tpu-v3", 1024, 32768, 64, 67.1, 4),
    Published("ResNet-50, 8 H100", "MLPerf Training v3.0, 3.0-2053 (13.466 min); batch 8 x 400 (NVIDIA "
              "config_DGXH100.sh)", "resnet50", "h100", 8, 3200, None, 13.466 * 60, 4),
    Published("ResNet-50, 3,584 H100", "MLPerf Training v3.0, 3.0-2002 (0.183 min); batch 57,344, converged at "
              "epoch 77 (result_0.txt)", "resnet50", "h100", 3584, 57344, 77, 0.183 * 60, 4),
)
"""The published runs the plan is checked against (at least six, as the issue asks)."""


@lru_cache(maxsize=None)
def _flops(model: str) -> tuple[float, int]:
    return model_flops(model, IMAGENET)


def predict(row: Published) -> float:
    """Predicted seconds to train for a published run (the module docstring)."""
    flops, params = _flops(row.model)
    convergence = fixed(row.epochs) if row.epochs is not None else mlperf_resnet()
    w = Workload(row.model, flops, params, IMAGENET.train, convergence,
                 eval_examples=IMAGENET.test if row.eval_every_epochs else 0,
                 eval_every_epochs=row.eval_every_epochs)
    return point(w, load_profile(row.profile), row.chips, row.batch).time_to_train_s


def check_table(rows: tuple[Published, ...] = PUBLISHED) -> tuple[list[str], list[float]]:
    """The check as text lines (label, chips, batch, epochs, predicted, published, ratio `N.NNx`) and the ratios."""
    head = f"{'published run':<40} {'chips':>6} {'batch':>7} {'epochs':>6} {'predicted':>10} {'published':>10} ratio"
    lines, ratios = [head, "-" * len(head)], []
    for r in rows:
        pred = predict(r)
        ratio = pred / r.seconds
        ratios.append(ratio)
        epochs = f"{r.epochs:g}" if r.epochs is not None else "RCP"
        lines.append(f"{r.label:<40} {r.chips:>6} {r.batch:>7} {epochs:>6} {_duration(pred):>10} "
                     f"{_duration(r.seconds):>10} {ratio:.2f}x")
    return lines, ratios


def _duration(seconds: float) -> str:
    """12.3 s, 4.5 min or 6.7 h."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
