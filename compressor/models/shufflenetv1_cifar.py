"""CIFAR ShuffleNetV1 as in RepDistiller/mdistiller ``ShuffleV1`` (Zhang et al., 2018, g = 3).

Module names and ``state_dict`` keys are RepDistiller's (``conv1``, ``bn1``, ``layer<k>.<i>.conv1..3``,
``bn1..3``, ``linear``), so their checkpoints load unchanged.

Departures, none of which adds or renames a parameter:
  * the stem conv takes ``in_chans`` channels;
  * RepDistiller's ``F.avg_pool2d(out, 4)`` (1x1 only at 32x32) is an ``AdaptiveAvgPool2d(1)``;
  * the stem's ReLU is a module (``stem_relu``) so its output, RepDistiller's ``f0``, can be tapped;
  * the last block of a stage returns only its output (RepDistiller also returns the pre-ReLU map,
    which no feature tap here uses).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.models.registry import register_model

STEM_CHANNELS = 24


class ShuffleBlock(nn.Module):
    """Channel shuffle: (N, g*c, H, W) -> (N, c*g, H, W) interleaving the g groups."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates a pooled shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, after_stem: bool) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # the block fed by the 24-channel stem uses an ungrouped first 1x1 (RepDistiller: in_planes == 24)
        g = 1 if after_stem else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """Three stages of ShuffleNetV1 units after a 1x1 stem (no stem downsampling, CIFAR-style)."""

    stem_name = "stem_relu"
    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "linear"

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.stem_relu = nn.ReLU()
        self._in_planes = STEM_CHANNELS
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            # the strided first unit concatenates its input, so its branch makes the difference
            branch = out_planes - self._in_planes if i == 0 else out_planes
            after_stem = self._in_planes == STEM_CHANNELS
            blocks.append(Bottleneck(self._in_planes, branch, 2 if i == 0 else 1, groups, after_stem))
            self._in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("ShuffleV1", family="shufflenetv1", searchable=True)
def shufflev1(num_classes: int = 100, in_chans: int = 3) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: out planes (240, 480, 960), blocks (4, 8, 4), 3 groups."""
    return ShuffleNetV1(num_classes=num_classes, in_chans=in_chans)
