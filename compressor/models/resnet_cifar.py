"""CIFAR ResNets (He et al. 2016, sec. 4.2) with RepDistiller's module names and state_dict keys.

The module tree matches ``models/resnet.py`` of RepDistiller (HobbitLong/RepDistiller, also used
by mdistiller): ``conv1``, ``bn1``, ``relu`` (stem), ``layer1..layer3`` of ``BasicBlock``
(``conv1/bn1/conv2/bn2`` and ``downsample.0`` conv 1x1 / ``downsample.1`` BN where the shape
changes) and ``fc``. So a checkpoint those codebases trained loads here with no key renaming.
Two deliberate differences, neither touching the keys: global pooling is adaptive (the models run
on any input from 8x8 up, e.g. the 1x8x8 digits), and blocks return only their output (no
``preact`` tuple), since features are read by hooks (compressor.features), not by ``is_feat``.

Systematic names (any value resolves through the pattern):

    resnet_d<depth>_w<width>[_s<stem>]

  * ``depth`` = 6n+2 (n BasicBlocks per stage), e.g. 8, 14, 20, 32, 44, 56, 110;
  * ``width`` multiplies the stage filters (16, 32, 64), rounded half up to ints, e.g. 0.5, 1, 4;
  * ``stem`` is the stem conv's channel count; left out it is ``16 * width`` (rounded).

The KD benchmark names are aliases: ``resnet20`` = ``resnet_d20_w1`` (filters 16/16/32/64) and
``resnet8x4`` = ``resnet_d8_w4_s32`` (filters 32/64/128/256: stages 4x wider, stem only 2x).

Budget-search grid (``searchable``): depths 8, 14, 20, 26, 32, 44, 56, 110 x widths 0.5, 1, 2 with
the default stem, plus width 4 with stem 32, the community's "x4" convention, so the grid's
widest members are exactly the resnet8x4/resnet32x4 family. Between grid widths the search names
any width in steps of 0.01 (depth and stem kept), down to 0.25 (4/8/16 filters).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.errors import UserError
from compressor.models._naming import WIDTH_RE, check_depth, fmt_width, parse_width, scale_channels
from compressor.models.registry import WidthScaling, add_model, register_alias, register_pattern, register_scaling

FAMILY = "resnet_cifar"
BASE_FILTERS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; 1x1 conv + BN on the shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # out-of-place add and ReLU: the block output (a tapped stage map) is a fresh tensor
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """Stem conv3x3 -> three stages of BasicBlocks (stride 1, 2, 2) -> global average -> fc."""

    stem_name = "relu"
    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "fc"

    def __init__(self, depth: int, filters: Sequence[int], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {depth}")
        if len(filters) != 4:
            raise ValueError(f"filters are (stem, stage1, stage2, stage3), got {list(filters)}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)  # the stem's output; called once in forward
        self.layer1 = self._make_stage(filters[0], filters[1], blocks, stride=1)
        self.layer2 = self._make_stage(filters[1], filters[2], blocks, stride=2)
        self.layer3 = self._make_stage(filters[2], filters[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        # RepDistiller's initialisation, so runs are comparable with theirs
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_filters(width: float = 1.0, stem: int | None = None) -> list[int]:
    """(stem, stage1, stage2, stage3) channels for a width multiplier; stem defaults to 16*width."""
    stages = [scale_channels(c, width) for c in BASE_FILTERS]
    return [stem if stem is not None else scale_channels(16, width), *stages]


def resnet_cifar(
    *, depth: int, width: float = 1.0, stem: int | None = None, num_classes: int = 100, in_chans: int = 3
) -> CifarResNet:
    """Factory used by the registry: ``resnet_d<depth>_w<width>[_s<stem>]``."""
    return CifarResNet(depth, resnet_filters(width, stem), num_classes=num_classes, in_chans=in_chans)


def resnet_name(depth: int, width: float = 1.0, stem: int | None = None) -> str:
    """The systematic name; the stem appears only when it is not the default ``16 * width``."""
    name = f"resnet_d{depth}_w{fmt_width(width)}"
    if stem is not None and stem != scale_channels(16, width):
        name += f"_s{stem}"
    return name


def _parse(match) -> dict:
    name = match.string
    depth = check_depth(name, int(match.group(1)), step=6, offset=2, minimum=8)
    kwargs = {"depth": depth, "width": parse_width(match.group(2), name)}
    if match.group(3) is not None:
        stem = int(match.group(3))
        if stem < 1:
            raise UserError(f"model {name!r}: the stem must have at least one channel")
        kwargs["stem"] = stem
    return kwargs


GRID_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
GRID_WIDTHS = (0.5, 1.0, 2.0)
X4_STEM = 32

# name -> (depth, width, stem): the benchmark names of RepDistiller's model_dict
BENCHMARKS = {
    **{f"resnet{d}": (d, 1.0, None) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, 4.0, X4_STEM),
    "resnet32x4": (32, 4.0, X4_STEM),
}


def _register() -> None:
    register_pattern(
        r"resnet_d(\d+)_w" + WIDTH_RE + r"(?:_s(\d+))?",
        resnet_cifar,
        family=FAMILY,
        parse=_parse,
        example="resnet_d20_w1",
    )
    grid = [(d, w, None) for d in GRID_DEPTHS for w in GRID_WIDTHS]
    grid += [(d, 4.0, X4_STEM) for d in GRID_DEPTHS]
    for depth, width, stem in grid:
        kwargs = {"depth": depth, "width": width, **({"stem": stem} if stem else {})}
        add_model(resnet_name(depth, width, stem), resnet_cifar, family=FAMILY, searchable=True, **kwargs)
    for alias, (depth, width, stem) in BENCHMARKS.items():
        register_alias(alias, resnet_name(depth, width, stem))
    register_scaling(FAMILY, WidthScaling(
        "width", lambda kw: resnet_name(kw["depth"], kw["width"], kw.get("stem")), min_width=0.25))


_register()
