"""A user's own project driven from the command line: model, data and recipe named by import path.

    export PYTHONPATH=examples      # your package: installed, or on PYTHONPATH
    largebatch train --model.name my_project:build_net --data.name my_project:load_data --task regression \\
        --batch.global-batch 1024 --optimizer.name lamb --optimizer.base-lr 2e-3 --epochs 10
    largebatch train --recipe my_project:recipe                       # the same, stated once in a recipe function
    torchrun --nproc-per-node 2 -m largebatch train --recipe my_project:recipe --output.name r2
    largebatch study --recipe my_project:recipe --batch-sizes 256,2048 --optimizers sgd,lamb --epochs 10

config.json records `my_project:build_net` and `my_project:load_data`, so `--resume`, torchrun restarts and study
workers import them again. `load_data` returns a `largebatch.data.Splits` of map-style Datasets (`Waves`), which
largebatch streams through DataLoader workers; `build_net` takes the keywords largebatch describes the data with
(`in_features`, `out_features` here) and ignores the rest (`**kw`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from largebatch.config import (BatchConfig, DataConfig, ModelConfig, OptimizerConfig, OutputConfig, RunConfig,
                               ScheduleConfig)
from largebatch.data import Splits


class Waves(Dataset):
    """Vectors x in [-1, 1]^8 with target y = sum_k sin(k x_k) / k + N(0, 0.1^2), example i from seed (seed, i)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = 2 * torch.rand(8, generator=g) - 1
        k = torch.arange(1, 9, dtype=x.dtype)
        return x, (torch.sin(k * x) / k).sum() + 0.1 * torch.randn((), generator=g)


def load_data(seed: int = 0, train_size: int = 8192) -> Splits:
    """The data set: `train_size` training and 2,048 test vectors (the test set is the same for every seed)."""
    return Splits(train=Waves(train_size, seed=1000 + seed), test=Waves(2048, seed=999))


def build_net(in_features: int, out_features: int, **kw) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, out_features))


def recipe() -> RunConfig:
    """LAMB at batch 1,024 with sqrt LR scaling, 10 epochs: test MSE about 0.02 (noise floor 0.01) in ~15 s."""
    return RunConfig(recipe="my-project", epochs=10, task="regression",
                     model=ModelConfig(name="my_project:build_net"),
                     data=DataConfig(name="my_project:load_data", workers=1),
                     optimizer=OptimizerConfig(name="lamb", base_lr=2e-3, reference_batch=256, scaling="sqrt"),
                     batch=BatchConfig(global_batch=1024),
                     schedule=ScheduleConfig(warmup_epochs=1, decay="cosine"),
                     output=OutputConfig(progress=False))


if __name__ == "__main__":
    import largebatch

    print(f"test MSE {largebatch.train(recipe())['test_loss']:.4f}")
