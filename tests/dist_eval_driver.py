"""Called on every rank of a torchrun launch of tests/runs_driver.py by test_distributed.py: evaluate one seeded
LeNet on the first `limit` MNIST test images sharded across the ranks, and write the result (rank 0) to the JSON
file `out`. Not a test module."""

import json

import torch

from largebatch import distributed
from largebatch.config import DataConfig, DistributedConfig
from largebatch.data import DeviceEval, load_splits
from largebatch.evaluator import evaluate
from largebatch.models import build_model
from largebatch.tasks import Classification


def evaluate_sharded(out: str, batch_size: str, limit: str) -> int:
    with distributed.session(DistributedConfig(), "cpu") as (d, device):
        split = DeviceEval(load_splits(DataConfig(test_limit=int(limit)), device)["test"])
        torch.manual_seed(0)
        model = build_model("lenet")
        with torch.no_grad():  # a model that is right on some images and wrong on others
            model.fc2.bias.copy_(torch.linspace(-1, 1, 10))
        r = evaluate(model, split, Classification(), int(batch_size), None, d)
        if d.is_main:
            with open(out, "w") as f:
                json.dump({**r, "world_size": d.world_size, "n": len(split)}, f)
    return 0
