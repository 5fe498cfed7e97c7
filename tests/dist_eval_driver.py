"""Run under torchrun by test_distributed.py: evaluate one seeded LeNet on the MNIST test set sharded
across the ranks, and write the result (rank 0) to the JSON file named by argv[1]. Not a test module."""

import json
import sys

import torch

from largebatch import distributed
from largebatch.config import DataConfig, DistributedConfig
from largebatch.data import DeviceEval, load_splits
from largebatch.models import build_model
from largebatch.evaluator import evaluate
from largebatch.tasks import Classification


def main() -> None:
    out, batch_size = sys.argv[1], int(sys.argv[2])
    with distributed.session(DistributedConfig(), "cpu") as (d, device):
        split = DeviceEval(load_splits(DataConfig(), device)["test"])
        torch.manual_seed(0)
        model = build_model("lenet")
        with torch.no_grad():  # a model that is right on some images and wrong on others
            model.fc2.bias.copy_(torch.linspace(-1, 1, 10))
        r = evaluate(model, split, Classification(), batch_size, None, d)
        if d.is_main:
            json.dump({**r, "world_size": d.world_size, "n": len(split)}, open(out, "w"))


if __name__ == "__main__":
    main()
