"""CIFAR VGGs with batch norm (Simonyan & Zisserman 2015) with RepDistiller's state_dict keys.

The module tree matches ``models/vgg.py`` of RepDistiller (HobbitLong/RepDistiller) built with
``batch_norm=True`` (their model_dict maps vgg8/11/13/16/19 to the ``_bn`` configurations):
five ``block0..block4`` Sequentials of conv3x3 (with bias) + BN + ReLU whose last ReLU is left
out, so a block ends on its BN (keys ``block0.0.weight``, ``block0.1.running_mean``, ...), then
``classifier`` (a single Linear: the CIFAR VGGs drop the 4096-wide FC layers).

Differences that touch no key (pools and ReLUs have no parameters):
  * the ReLU after each block is a module (``relu0..relu4``), so feature taps read the same
    post-ReLU maps RepDistiller returns with ``is_feat=True``: ``relu0`` is the stem (f0),
    ``relu1..relu4`` the stages (f1..f4);
  * a 2x2 max-pool is skipped when the map is already smaller than 2x2, so 8x8 inputs work;
  * ``pool3`` runs when the input is at least 64 pixels high (RepDistiller: exactly 64).

Names: ``vgg<depth>_w<width>`` with depth in 8, 11, 13, 16, 19 (configurations S, A, B, D, E)
and ``width`` multiplying every conv's channels (rounded half up). The benchmark names are
aliases: ``vgg13`` = ``vgg13_w1``.

Budget-search grid (``searchable``): every depth x widths 0.25, 0.5, 1; between them the search
names any width in steps of 0.01 (depth kept), down to 0.125 (8 channels in block0).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from compressor.models._init import repdistiller_init
from compressor.errors import UserError
from compressor.models._naming import WIDTH_RE, fmt_width, parse_width, scale_channels
from compressor.models.registry import WidthScaling, add_model, register_alias, register_pattern, register_scaling

FAMILY = "vgg"

# channels of the convs in block0..block4, per depth (the paper's configurations)
CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],  # "S"
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],  # "A"
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # "B"
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # "D"
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],  # "E"
}


def _make_block(channels: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        in_channels = c
    return nn.Sequential(*layers[:-1])  # ends on BN: the block's ReLU is applied outside


class CifarVGG(nn.Module):
    stem_name = "relu0"
    stage_names = ("relu1", "relu2", "relu3", "relu4")
    classifier_name = "classifier"

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(config) != 5:
            raise ValueError(f"a VGG configuration has 5 blocks, got {len(config)}")
        ins = [in_chans] + [block[-1] for block in config[:-1]]
        for i, (block, in_channels) in enumerate(zip(config, ins)):
            setattr(self, f"block{i}", _make_block(block, in_channels))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        for i in range(5):  # not in-place: their outputs are the tapped feature maps
            setattr(self, f"relu{i}", nn.ReLU())
        self.classifier = nn.Linear(config[-1][-1], num_classes)
        repdistiller_init(self)

    @staticmethod
    def _pool(pool: nn.Module, x: Tensor) -> Tensor:
        # a 2x2 max-pool of a 1-pixel map fails: skip it (shapes are static, so export is unaffected)
        return pool(x) if min(x.shape[-2:]) >= 2 else x

    def forward(self, x: Tensor) -> Tensor:
        tall = x.shape[2] >= 64
        x = self._pool(self.pool0, self.relu0(self.block0(x)))
        x = self._pool(self.pool1, self.relu1(self.block1(x)))
        x = self._pool(self.pool2, self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if tall:
            x = self._pool(self.pool3, x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def vgg(*, depth: int, width: float = 1.0, num_classes: int = 100, in_chans: int = 3) -> CifarVGG:
    """Factory used by the registry: ``vgg<depth>_w<width>``."""
    if depth not in CONFIGS:
        raise UserError(f"VGG depth {depth} is not one of {sorted(CONFIGS)}")
    config = [[scale_channels(c, width) for c in block] for block in CONFIGS[depth]]
    return CifarVGG(config, num_classes=num_classes, in_chans=in_chans)


def vgg_name(depth: int, width: float = 1.0) -> str:
    return f"vgg{depth}_w{fmt_width(width)}"


def _parse(match) -> dict:
    name = match.string
    depth = int(match.group(1))
    if depth not in CONFIGS:
        raise UserError(f"model {name!r}: VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    return {"depth": depth, "width": parse_width(match.group(2), name)}


GRID_WIDTHS = (0.25, 0.5, 1.0)


def _register() -> None:
    register_pattern(r"vgg(\d+)_w" + WIDTH_RE, vgg, family=FAMILY, parse=_parse, example="vgg13_w0.5")
    for depth in CONFIGS:
        for width in GRID_WIDTHS:
            add_model(vgg_name(depth, width), vgg, family=FAMILY, searchable=True, depth=depth, width=width)
        register_alias(f"vgg{depth}", vgg_name(depth))
    register_scaling(FAMILY, WidthScaling("width", lambda kw: vgg_name(kw["depth"], kw["width"]), min_width=0.125))


_register()
