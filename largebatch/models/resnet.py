"""ResNets: ResNet-50 v1.5, v1 and v2 (pre-activation) for ImageNet, and CIFAR-10 variants.

* `resnet50` -- ResNet-50 v1.5, torchvision's `resnet50(weights=None)`, the MLPerf reference model: the
  stride 2 of each down-sampling bottleneck sits in its 3x3 conv. 25,557,032 parameters (1000 classes).
* `resnet50_v1` -- ResNet-50 v1 of "Deep Residual Learning for Image Recognition" (He et al. 2015): the
  same network with the stride in the first 1x1 conv of each down-sampling bottleneck (the 3x3 conv then
  works at the lower resolution; fewer FLOPs, same 25,557,032 parameters).
* `PreActResNet` / `resnet50_v2` -- pre-activation ResNet-50 of "Identity Mappings in Deep Residual
  Networks" (He et al. 2016): each block is BN-ReLU-conv three times and adds its input unchanged; the
  projection shortcut of a block that changes shape is a 1x1 conv of the *pre-activated* input; the stem
  is a bare 7x7 conv + max-pool (the first block's BN-ReLU normalises it) and a BN-ReLU follows the last
  stage before global pooling. Stride as in v1.5 (in the 3x3 conv of each stage's first block), as in
  fb.resnet.torch and timm's `resnetv2_50`; Keras' `ResNet50V2` strides the *last* block of each stage.
  25,549,352 parameters; Keras' `ResNet50V2` has 25,568,360 trainable ones, 19,008 more: its last 1x1 conv
  of each block, its shortcut convs and its stem conv have biases.
* `resnet50_cifar` -- ResNet-50 v1 for 32x32 inputs: 3x3 stride-1 stem conv, no max-pool, then the same
  four bottleneck stages (spatial 32 -> 16 -> 8 -> 4). 23,520,842 parameters with 10 classes.
* `CifarResNet` / `resnet20_cifar` -- the CIFAR-10 ResNet of He et al. 2015 section 4.2: 3x3 conv (16),
  three stages of n basic blocks (16, 32, 64 channels; 32x32, 16x16, 8x8), global pooling, fc; depth 6n+2,
  n = 3 for ResNet-20. Option-A shortcuts (the paper's choice for CIFAR): identity, or where the shape
  changes, the input sub-sampled by 2 with the new channels zero -- parameter free; 269,722 parameters
  ("0.27M" in the paper's Table 6).

Initialisation (torchvision's): convs Kaiming normal (fan_out, ReLU gain), BN weight 1 and bias 0, the fc
layer PyTorch's default. `zero_init_residual=True` (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
makes every residual block start as its shortcut: for post-activation blocks (v1, v1.5, CIFAR) the gamma of
the block's last BN is zero, so block(x) = relu(shortcut(x)). For pre-activation blocks (v2) the last
conv's weight is zeroed instead, so block(x) = shortcut(x): the last BN there is followed by a ReLU, and a
zero gamma (with beta 0) would feed ReLU exactly 0, whose gradient PyTorch takes as 0 -- gamma and beta would
get no gradient and the branch would stay dead; a zero conv weight still gets the gradient
relu(bn3(.))^T * upstream, and the branch starts learning at the first step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet


def _kaiming_(conv: nn.Conv2d) -> nn.Conv2d:
    """Kaiming normal (fan_out, ReLU) weights as torchvision's ResNet initialises its convs."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _init_weights_(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming normal convs, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _kaiming_(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stride_in_first_conv_(model: tv_resnet.ResNet) -> tv_resnet.ResNet:
    """Turn a v1.5 torchvision ResNet into v1: in each bottleneck that down-samples, move the stride from
    the 3x3 conv (`conv2`) to the first 1x1 conv (`conv1`). Parameters are unchanged."""
    for m in model.modules():
        if isinstance(m, tv_resnet.Bottleneck) and m.conv2.stride != (1, 1):
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
    return model


def resnet50(num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-50 v1.5 (torchvision, MLPerf): stride 2 in the 3x3 conv of each down-sampling bottleneck."""
    model = tv_resnet.resnet50(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if in_channels != 3:
        model.conv1 = _kaiming_(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False))
    return model


def resnet50_v1(num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-50 v1 (He et al. 2015): stride 2 in the first 1x1 conv of each down-sampling bottleneck."""
    return _stride_in_first_conv_(resnet50(num_classes, in_channels, zero_init_residual))


def resnet50_cifar(num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-50 v1 for 32x32 inputs: 3x3 stride-1 stem conv and no max-pool, the same bottleneck stages."""
    model = resnet50_v1(num_classes, 3, zero_init_residual)
    model.conv1 = _kaiming_(nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False))
    model.maxpool = nn.Identity()
    return model


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016, fig. 4e / "full pre-activation"):

        p = relu(bn1(x))
        out = conv3(relu(bn3(conv2(relu(bn2(conv1(p)))))))
        return out + (downsample(p) if downsample else x)

    conv1 1x1 in->planes, conv2 3x3 planes->planes with the stride, conv3 1x1 planes->4*planes, all without
    bias; `downsample` is a 1x1 strided conv (no BN: the next block's bn1 normalises the sum).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)  # in place on fresh BN outputs only
        self.downsample: nn.Conv2d | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for ImageNet (He et al. 2016); `layers=(3, 4, 6, 3)` is ResNet-50 v2.

    stem: 7x7/2 conv (64, no bias) -> 3x3/2 max-pool; four stages of `PreActBottleneck`s (64, 128, 256,
    512 bottleneck widths; the first block of stages 2-4 has stride 2 in its 3x3 conv); BN -> ReLU ->
    global average pool -> fc. Attribute names follow torchvision's ResNet (`conv1`, `layer1`..`layer4`,
    `fc`); `bn_final` is the post-stage BN.
    """

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000,
                 in_channels: int = 3, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(PreActBottleneck(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBottleneck):
                    nn.init.zeros_(m.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_v2(num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """Pre-activation ResNet-50 (He et al. 2016), stride in the 3x3 convs as v1.5; 25,549,352 parameters."""
    return PreActResNet((3, 4, 6, 3), num_classes, in_channels, zero_init_residual)


class BasicBlockA(nn.Module):
    """CIFAR ResNet basic block (He et al. 2015 section 4.2) with an option-A shortcut:

        relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))

    two 3x3 convs (the first carries the stride); `shortcut(x)` is x, or where the block halves the
    resolution and widens, x[:, :, ::2, ::2] with zero channels appended -- no parameters.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.extra_channels = planes - in_planes
        if self.extra_channels < 0:
            raise ValueError(f"an option-A shortcut cannot narrow {in_planes} to {planes} channels")

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: sub-sample by the stride and pad the new channels with zeros."""
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. 2015 section 4.2, depth 6n+2 (20, 32, 44, 56, 110, ...).

    3x3 conv (16) -> BN -> ReLU -> three stages of n `BasicBlockA` (16, 32, 64 channels; the first block of
    stages 2 and 3 has stride 2) -> global average pool -> fc.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            stage = []
            for j in range(n):
                stage.append(BasicBlockA(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlockA):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20_cifar(num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-20 for CIFAR-10 (He et al. 2015 section 4.2), option-A shortcuts; 269,722 parameters."""
    return CifarResNet(20, num_classes, in_channels, zero_init_residual)
