"""ImageNet-style ResNets sized for CIFAR (4 stages, 3x3 stem, no stem pooling), RepDistiller keys.

The module tree matches ``models/resnetv2.py`` of RepDistiller (HobbitLong/RepDistiller), whose
``ResNet50`` is a common CIFAR-100 teacher: ``conv1``, ``bn1``, ``layer1..layer4`` of blocks with
``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``shortcut.0`` (1x1 conv) / ``shortcut.1`` (BN) where the
shape changes (an empty ``shortcut`` otherwise, which holds no keys), and ``linear``. A ReLU
module ``relu`` (no parameters, keys unchanged) marks the stem output for feature taps.

Names are RepDistiller's: ResNet18, ResNet34 (BasicBlock), ResNet50, ResNet101, ResNet152
(Bottleneck, expansion 4). They are teacher-sized (ResNet18 is already 0.56 GFLOPs at 32x32), so
none is in the budget-search grid.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.models.registry import add_model

FAMILY = "resnet_v2_cifar"


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity, and no state_dict keys (as in the reference)
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlockV2(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out-of-place: x may be a tapped stage map


class BottleneckV2(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(nn.Module):
    """conv3x3(64) stem -> four stages (64, 128, 256, 512 planes; stride 1, 2, 2, 2) -> linear."""

    stem_name = "relu"
    stage_names = ("layer1", "layer2", "layer3", "layer4")
    classifier_name = "linear"

    def __init__(
        self,
        block: type[BasicBlockV2] | type[BottleneckV2],
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(blocks):
                layers.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts as identity
            for m in self.modules():
                if isinstance(m, BottleneckV2):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlockV2):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


VARIANTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "ResNet18": ("basic", (2, 2, 2, 2)),
    "ResNet34": ("basic", (3, 4, 6, 3)),
    "ResNet50": ("bottleneck", (3, 4, 6, 3)),
    "ResNet101": ("bottleneck", (3, 4, 23, 3)),
    "ResNet152": ("bottleneck", (3, 8, 36, 3)),
}
_BLOCKS = {"basic": BasicBlockV2, "bottleneck": BottleneckV2}


def resnet_v2_cifar(
    *,
    block: str,
    num_blocks: Sequence[int],
    num_classes: int = 100,
    in_chans: int = 3,
    zero_init_residual: bool = False,
) -> CifarResNetV2:
    """Factory used by the registry; ``block`` is "basic" or "bottleneck"."""
    return CifarResNetV2(
        _BLOCKS[block], list(num_blocks), num_classes=num_classes, in_chans=in_chans,
        zero_init_residual=zero_init_residual,
    )


def _register() -> None:
    for name, (block, blocks) in VARIANTS.items():
        add_model(name, resnet_v2_cifar, family=FAMILY, searchable=False, block=block, num_blocks=blocks)


_register()
