"""Your own CNN on your own tensors, trained by largebatch at a large batch with LARS.

    .venv/bin/python examples/own_model.py            # ~10 s on 2 cores: 99.4% test accuracy

Ten lines of it are what a user writes: a model class (its constructor takes the keywords largebatch describes
the data with -- `num_classes`, `in_channels`, `image_size` -- the ones it names, or all with `**kw`), tensors in a
`Splits`, and a `RunConfig` stating batch-invariant quantities: the global batch, the base LR at a reference batch,
the epochs. largebatch derives the accumulation steps and the scaled LR, and brings every feature: LARS's
trust ratios, warmup and polynomial decay, diagnostics in metrics.jsonl, a checkpoint to resume from.
"""

from __future__ import annotations

import torch
from torch import nn

import largebatch
from largebatch.config import BatchConfig, OptimizerConfig, OutputConfig, RunConfig, ScheduleConfig
from largebatch.data import Splits


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of 10 fixed random 16x16 templates (the same templates for every `seed`); label = template."""
    templates = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 1, 16, 16, generator=g), y


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main(out: str = "runs/examples", epochs: float = 6, n: int = 8192) -> dict:
    cfg = RunConfig(recipe="own-model", epochs=epochs, threads=2,
                    optimizer=OptimizerConfig(name="lars", base_lr=0.5, reference_batch=256, weight_decay=5e-4,
                                              lars_form="unscaled", trust_coefficient=0.02),
                    batch=BatchConfig(global_batch=2048, micro_batch=512),  # 4 accumulation steps of 512
                    schedule=ScheduleConfig(warmup_epochs=1, decay="poly"),
                    output=OutputConfig(dir=out, progress=False))  # a new run directory own-model-<time>
    data = Splits(train=make_data(n, seed=0), test=make_data(2048, seed=1))
    return largebatch.train(cfg, model=SmallCNN, data=data)


if __name__ == "__main__":
    summary = main()
    print(f"test accuracy {100 * summary['test_accuracy']:.2f}% in {summary['train_seconds']:.1f} s")
