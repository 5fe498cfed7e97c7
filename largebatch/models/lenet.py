"""LeNet-5 as in Caffe's MNIST example (examples/mnist/lenet_train_test.prototxt).

conv 20@5x5 -> max-pool 2 -> conv 50@5x5 -> max-pool 2 -> fc 500 -> ReLU -> fc 10, with Xavier
(fan-in, uniform) weights and zero biases as Caffe initialises them; 431,080 parameters. This is
the network of the MNIST experiments in "The Limit of the Batch Size" (You et al.).

`LeNet5BN` is the same network with batch norm after conv1, conv2 and fc1 (432,220 parameters), the
model on which ghost batch norm (`largebatch.nn.convert_ghost_bn`) acts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _caffe_xavier_(*layers: nn.Conv2d | nn.Linear) -> None:
    """Caffe "xavier" filler: weights U(-sqrt(3/fan_in), +sqrt(3/fan_in)), biases zero."""
    for m in layers:
        fan_in = m.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        _caffe_xavier_(self.conv1, self.conv2, self.fc1, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LeNet5BN(nn.Module):
    """LeNet-5 with batch norm: conv1 -> BN2d(20) -> max-pool -> conv2 -> BN2d(50) -> max-pool -> fc1 ->
    BN1d(500) -> ReLU -> fc2.

    Same Caffe Xavier initialisation as `LeNet5`. The conv/fc layers followed by a batch norm keep their
    (zero-initialised) biases although the norm's mean subtraction makes them redundant: simplest, and the
    parameter names match `LeNet5`'s. BN weights start at 1, biases at 0 (torch defaults).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.bn2 = nn.BatchNorm2d(50)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.bn3 = nn.BatchNorm1d(500)
        self.fc2 = nn.Linear(500, num_classes)
        _caffe_xavier_(self.conv1, self.conv2, self.fc1, self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.bn1(self.conv1(x)), 2)
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2)
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)
