"""largebatch's optimizers in a plain PyTorch loop: no config, no trainer, only `largebatch.optim` and torch.

    .venv/bin/python examples/optimizers_alone.py            # ~10 s on 2 cores

A small CNN learns a synthetic 10-class problem at batch 1,024 with LARS (the MLPerf "scaled" form), then
with LAMB, each with separate weight-decay and trust-ratio masks (`param_groups`: biases and norm
parameters get neither) and linear warmup written into `group["lr"]` each step, as any torch optimizer.
The same objects drop into Lightning's `configure_optimizers` or a Hugging Face `Trainer(optimizers=...)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.optim import LAMB, LARS, audit, param_groups


def make_data(n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of 10 fixed random 16x16 templates (the same templates for every `seed`); label = template."""
    templates = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + 0.8 * torch.randn(n, 1, 16, 16, generator=g)
    return x, y


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def train(opt_name: str, steps: int = 40, batch: int = 1024, warmup: int = 10) -> float:
    torch.manual_seed(0)
    x, y = make_data()
    model = make_model()
    groups = param_groups(model, weight_decay=5e-4, weight_decay_on="weights", adapt_on="weights")
    if opt_name == "lars":
        opt: torch.optim.Optimizer = LARS(groups, lr=2.0, momentum=0.9, trust_coefficient=0.001, form="scaled")
    else:
        opt = LAMB(groups, lr=0.01, betas=(0.9, 0.999), min_ratio=0.01, max_ratio=10.0)
    peak = opt.param_groups[0]["lr"]
    for step in range(steps):
        for group in opt.param_groups:  # warmup, then constant: a schedule is a function of the step
            group["lr"] = peak * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if opt_name == "lars":
        print(audit(model, opt).splitlines()[0])
    model.eval()
    xt, yt = make_data(1000, seed=1)
    with torch.no_grad():
        return (model(xt).argmax(1) == yt).float().mean().item()


if __name__ == "__main__":
    for name in ("lars", "lamb"):
        print(f"{name}: held-out accuracy {100 * train(name):.1f}%")
