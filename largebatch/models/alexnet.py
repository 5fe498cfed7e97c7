"""AlexNet, and AlexNet with batch norm as in the LARS paper.

* `alexnet` -- the one-tower AlexNet of "One weird trick for parallelizing convolutional neural networks"
  (Krizhevsky 2014), as torchvision builds it (`torchvision.models.alexnet(weights=None)`): convs
  64@11x11/4, 192@5x5, 384@3x3, 256@3x3, 256@3x3 with ReLU and three 3x3/2 max-pools, adaptive average
  pool to 6x6, then dropout-fc 4096-ReLU-dropout-fc 4096-ReLU-fc; no LRN, conv/fc biases, PyTorch's default
  initialisation. 61,100,840 parameters (1000 classes).
* `AlexNetBN` -- "AlexNet-BN" of "Large Batch Training of Convolutional Networks" (You et al. 2017, the
  LARS paper), which replaces AlexNet's local response normalisation by batch norm: the same layers as
  `alexnet` with a BN after every conv and after each of the two hidden fc layers (before the ReLU), no LRN
  and no dropout. The convs and hidden fc layers carry no bias (the BN's beta replaces it). 61,110,184
  parameters (1000 classes). The widths are torchvision's one-tower ones; the LARS paper's Caffe model
  derives from BVLC AlexNet, whose widths differ (96/256/384/384/256 convs), so parameter counts differ.

Both end with an adaptive average pool to 6x6, so inputs smaller than the natural 224x224 (down to 63x63)
also run -- for tests and quick experiments; the 6x6 map is then a replicated 1x1 or 2x2 one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import alexnet as _tv_alexnet


def alexnet(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's one-tower AlexNet (Krizhevsky 2014); a first conv for `in_channels` if not 3."""
    model = _tv_alexnet(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
    return model


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             padding: int = 0) -> list[nn.Module]:
    """conv (no bias) -> BN -> ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class AlexNetBN(nn.Module):
    """AlexNet-BN (You et al. 2017): torchvision's AlexNet with BN after each conv and hidden fc layer,
    no LRN, no dropout.

    features: [conv 64@11x11/4 p2, BN, ReLU, max-pool 3/2, conv 192@5x5 p2, BN, ReLU, max-pool 3/2,
    conv 384@3x3 p1, BN, ReLU, conv 256@3x3 p1, BN, ReLU, conv 256@3x3 p1, BN, ReLU, max-pool 3/2];
    avgpool: adaptive to 6x6; classifier: [fc 9216->4096, BN, ReLU, fc 4096->4096, BN, ReLU,
    fc 4096->num_classes]. Convs are Kaiming normal (fan_out, ReLU) as in torchvision's ResNet, BN weights 1
    and biases 0, fc layers PyTorch's default.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 64, 11, stride=4, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn(64, 192, 5, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn(192, 384, 3, padding=1),
            *_conv_bn(384, 256, 3, padding=1),
            *_conv_bn(256, 256, 3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096, bias=False),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096, bias=False),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
