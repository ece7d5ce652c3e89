"""The small CNNs of OSAKD (Tzelepi & Tefas, "Efficient training of lightweight neural networks using
Online Self-Acquired Knowledge Distillation", Sec. IV-A).

The paper's text (/work/shared/papers/osakd-online-self-acquired-kd.txt) lost its math: it keeps the
filter COUNTS (6 and 16 for CIFAR-10/SVHN, 20 and 50 for Fashion-MNIST), "five layers", ReLU,
max-pooling with stride 2, three resp. two fully connected layers, but not the kernel sizes or the
hidden widths, and it cites no source for the architectures. The counts identify the two classic
LeNets, whose missing numbers are used here:
  * ``osakd_cnn5`` (CIFAR-10 / SVHN): LeNet-5 (LeCun et al., 1998) as in the PyTorch CIFAR-10
    tutorial: conv 6@5x5 -> ReLU -> maxpool 2 -> conv 16@5x5 -> ReLU -> maxpool 2 -> FC 120 -> ReLU
    -> FC 84 -> ReLU -> FC classes. At 32x32 the flattened map is 16x5x5 = 400.
  * ``osakd_fmnist_cnn`` (Fashion-MNIST): Caffe's LeNet: conv 20@5x5 -> ReLU -> maxpool 2 ->
    conv 50@5x5 -> ReLU -> maxpool 2 -> FC 500 -> ReLU -> FC classes. At 28x28 the map is 50x4x4 = 800.

Any input size from 8x8 up (the zoo's contract; sklearn's digits are 8x8): inputs smaller than
the 16x16 the two valid 5x5 convs and two poolings need are zero-padded to 16x16 (centred), and an
adaptive average pooling brings the last map to the native grid (5x5, resp. 4x4) before the
classifier. At the native input size both steps are the identity, so the networks, their
parameter counts and FLOPs are exactly the LeNets above.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.models.registry import register_model

MIN_SIDE = 16  # smallest input two valid 5x5 convs, each followed by a 2x2 pooling, accept


class LeNet(nn.Module):
    """Two conv/ReLU/max-pool stages, then fully connected layers; the last FC is the classifier."""

    stem_name = None
    stage_names = ("pool1", "pool2")
    classifier_name = "classifier"

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        conv_channels: tuple[int, int],
        hidden: tuple[int, ...],
        grid: int,
    ) -> None:
        super().__init__()
        c1, c2 = conv_channels
        self.conv1 = nn.Conv2d(in_chans, c1, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.grid = nn.AdaptiveAvgPool2d(grid)
        widths = (c2 * grid * grid, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h < MIN_SIDE or w < MIN_SIDE:
            ph, pw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.grid(x).flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.classifier(x)


@register_model("osakd_cnn5", family="osakd_cnn", searchable=True)
def osakd_cnn5(num_classes: int = 10, in_chans: int = 3) -> LeNet:
    """OSAKD's five-layer CIFAR-10/SVHN CNN (LeNet-5: 6@5x5, 16@5x5, FC 120, 84, classes)."""
    return LeNet(num_classes, in_chans, (6, 16), (120, 84), grid=5)


@register_model("osakd_fmnist_cnn", family="osakd_cnn", searchable=True)
def osakd_fmnist_cnn(num_classes: int = 10, in_chans: int = 1) -> LeNet:
    """OSAKD's Fashion-MNIST CNN (Caffe LeNet: 20@5x5, 50@5x5, FC 500, classes)."""
    return LeNet(num_classes, in_chans, (20, 50), (500,), grid=4)
