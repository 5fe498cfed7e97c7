"""LeNet-5 as in Caffe's MNIST example (examples/mnist/lenet_train_test.prototxt).

conv 20@5x5 -> max-pool 2 -> conv 50@5x5 -> max-pool 2 -> fc 500 -> ReLU -> fc 10, with Xavier
(fan-in, uniform) weights and zero biases as Caffe initialises them; 431,080 parameters. This is
the network of the MNIST experiments in "The Limit of the Batch Size" (You et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(3.0 / fan_in)  # Caffe "xavier" filler: U(-sqrt(3/fan_in), +)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
