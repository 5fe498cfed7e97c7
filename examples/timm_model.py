"""A model from timm by name, on your own images: `--model.name timm:<model>` from the command line, or
`ModelConfig(name="timm:<model>")` from Python -- no model code at all.

    .venv/bin/python examples/timm_model.py            # ~40 s on 2 cores (pip install timm)

timm builds the model with the data's `num_classes` and `in_chans`; `torchvision:<model>` works the same way for
torchvision's classifiers (RGB data). Here: timm's `resnet10t` on 3x32x32 noisy templates, SGD with warmup.
"""

from __future__ import annotations

import torch

import largebatch
from largebatch.config import BatchConfig, ModelConfig, OptimizerConfig, OutputConfig, RunConfig, ScheduleConfig
from largebatch.data import Splits


def make_images(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of 10 fixed random RGB templates; label = template."""
    templates = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 3, size, size, generator=g), y


def main(out: str = "runs/examples", model: str = "timm:resnet10t", epochs: float = 2, n: int = 2048) -> dict:
    cfg = RunConfig(recipe="timm-model", epochs=epochs, threads=2, model=ModelConfig(name=model),
                    optimizer=OptimizerConfig(name="sgd", base_lr=0.1, reference_batch=256, weight_decay=5e-5),
                    batch=BatchConfig(global_batch=512, micro_batch=128),
                    schedule=ScheduleConfig(warmup_epochs=0.5, decay="cosine"),
                    output=OutputConfig(dir=out, progress=False))
    return largebatch.train(cfg, data=Splits(train=make_images(n, 0), test=make_images(512, 1)))


if __name__ == "__main__":
    summary = main()
    print(f"{summary['test_accuracy']:.2%} test accuracy in {summary['train_seconds']:.1f} s")
