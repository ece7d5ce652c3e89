"""Wide ResNets (Zagoruyko & Komodakis 2016) with RepDistiller's module names and state_dict keys.

The module tree matches ``models/wrn.py`` of RepDistiller (HobbitLong/RepDistiller): ``conv1``
(stem, 16 channels), ``block1..block3`` each holding ``layer`` (a Sequential of pre-activation
blocks with ``bn1/conv1/bn2/conv2`` and ``convShortcut`` where the width changes), then ``bn1``,
``relu`` and ``fc``. Global pooling is adaptive (no parameters, keys unchanged), so any input
from 8x8 up works.

Names: ``wrn_<depth>_<k>`` -- WRN-d-k of the paper, depth = 6n+4 (n blocks per stage), ``k`` the
widening factor of the stage filters (16k, 32k, 64k; a fractional k is rounded half up per
stage). This is also RepDistiller's spelling, so wrn_16_1, wrn_16_2, wrn_40_1 and wrn_40_2 are
the systematic names themselves (no aliases needed); any other d, k resolves via the pattern.

Budget-search grid (``searchable``): depths 16, 22, 28, 40 x k = 1, 2, 4, 8; between them the search
names any k in steps of 0.01 (depth kept), down to 0.25 (4/8/16 filters after the 16-channel stem).
"""

from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.models._naming import WIDTH_RE, check_depth, fmt_width, parse_width, scale_channels
from compressor.models.registry import WidthScaling, add_model, register_pattern, register_scaling

FAMILY = "wrn"
STEM_CHANNELS = 16


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    Where the width changes the 1x1 shortcut conv reads the *activated* input, as in the
    reference implementation (the BN-ReLU is shared by both branches).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut: nn.Module | None = None  # noqa: N815 (RepDistiller's key name)
        if in_planes != out_planes or stride != 1:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))  # bn1 makes a new tensor: x itself is never modified
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One stage; the blocks sit under ``.layer`` so the keys read ``block1.layer.0.conv1``."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """conv3x3 stem -> three wide stages (stride 1, 2, 2) -> BN-ReLU -> global average -> fc."""

    stem_name = "conv1"
    stage_names = ("block1", "block2", "block3")
    classifier_name = "fc"

    def __init__(
        self,
        depth: int,
        widen_factor: float = 1,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 >= 10, got {depth}")
        blocks = (depth - 4) // 6
        widths = [scale_channels(c, widen_factor) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, STEM_CHANNELS, widths[0], 1, drop_rate)
        self.block2 = NetworkBlock(blocks, widths[0], widths[1], 2, drop_rate)
        self.block3 = NetworkBlock(blocks, widths[1], widths[2], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        # RepDistiller's initialisation (He normal over fan-out, BN 1/0, zero classifier bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn(*, depth: int, widen_factor: float = 1, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """Factory used by the registry: ``wrn_<depth>_<k>``."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


def wrn_name(depth: int, widen_factor: float) -> str:
    return f"wrn_{depth}_{fmt_width(widen_factor)}"


def _parse(match) -> dict:
    name = match.string
    depth = check_depth(name, int(match.group(1)), step=6, offset=4, minimum=10)
    return {"depth": depth, "widen_factor": parse_width(match.group(2), name)}


GRID_DEPTHS = (16, 22, 28, 40)
GRID_WIDTHS = (1, 2, 4, 8)


def _register() -> None:
    register_pattern(r"wrn_(\d+)_" + WIDTH_RE, wrn, family=FAMILY, parse=_parse, example="wrn_40_2")
    for depth in GRID_DEPTHS:
        for k in GRID_WIDTHS:
            add_model(wrn_name(depth, k), wrn, family=FAMILY, searchable=True, depth=depth, widen_factor=k)
    register_scaling(FAMILY, WidthScaling(
        "widen_factor", lambda kw: wrn_name(kw["depth"], kw["widen_factor"]), min_width=0.25))


_register()
