"""A torch Dataset of feature vectors, too big to hold in memory, streamed by DataLoader workers into a
regression task trained with LAMB at a large batch.

    .venv/bin/python examples/regression_dataset.py     # ~35 s on 2 cores: test MSE 8.8 (var(y) ~24, noise 1)

The data set is Friedman's #1 regression problem (Friedman 1991): y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4
+ 5 x5 + N(0, 1), x uniform in [0, 1]^10 (five of the ten features are noise). Each example is computed in
`__getitem__` from its index, the way a data set on disk is read one record at a time, so the data set can be
any size: largebatch streams it through DataLoader workers, and the batch of step s is still a pure function of
(seed, s) -- resuming, or training on 2 ranks, sees the same examples. The task is `regression` (mean squared
error; the study and time-to-target read its loss, lower is better).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

import largebatch
from largebatch.config import (BatchConfig, DataConfig, EvalConfig, OptimizerConfig, OutputConfig, RunConfig,
                               ScheduleConfig)
from largebatch.data import Splits


class Friedman1(Dataset):
    """`n` examples (x: float32 [10], y: float32 scalar) of Friedman's #1 problem, example i drawn from seed
    (seed, i): reading an example costs what reading a record would, and nothing is held in memory."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.rand(10, generator=g)
        y = (10 * torch.sin(math.pi * x[0] * x[1]) + 20 * (x[2] - 0.5) ** 2 + 10 * x[3] + 5 * x[4]
             + torch.randn((), generator=g))
        return x, y


def build_mlp(in_features: int, out_features: int) -> nn.Module:
    """An MLP for vectors; largebatch passes the data's `in_features` (10) and `out_features` (1)."""
    return nn.Sequential(nn.Linear(in_features, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, out_features))


def main(out: str = "runs/examples", epochs: float = 20, n: int = 16384, workers: int = 1, global_batch: int = 4096,
         base_lr: float = 0.03) -> dict:
    cfg = RunConfig(recipe="friedman-lamb", epochs=epochs, threads=1, task="regression",  # 1 core each: trainer, worker
                    data=DataConfig(workers=workers),
                    optimizer=OptimizerConfig(name="lamb", base_lr=base_lr, reference_batch=256, scaling="sqrt",
                                              weight_decay=0.01),
                    batch=BatchConfig(global_batch=global_batch),
                    schedule=ScheduleConfig(warmup_epochs=2, decay="cosine"), eval=EvalConfig(every_epochs=5),
                    output=OutputConfig(dir=out, progress=False))
    data = Splits(train=Friedman1(n, seed=0), test=Friedman1(4096, seed=1))
    return largebatch.train(cfg, model=build_mlp, data=data)


if __name__ == "__main__":
    summary = main()
    print(f"test MSE {summary['test_loss']:.3f} (RMSE {summary['test_rmse']:.3f}) in {summary['train_seconds']:.1f} s")
