"""CIFAR MobileNetV2 as in RepDistiller/mdistiller (Sandler et al., 2018; CIFAR variant of RCO).

Module names and ``state_dict`` keys are RepDistiller's (``conv1.0.weight``, ``blocks.<i>.<j>.conv.<k>``,
``conv2.0.weight``, ``classifier.0.weight``), so their checkpoints load unchanged. Their
``mobile_half`` (expand ratio 6, width 0.5) is the KD benchmark's ``MobileNetV2``.

Departures, none of which adds or renames a parameter:
  * the first conv takes ``in_chans`` channels;
  * RepDistiller's fixed ``AvgPool2d(input_size // 16, ceil_mode=True)`` (1x1 output only at 32x32)
    is an ``AdaptiveAvgPool2d(1)``: identical at 32x32, and any input from 8x8 up works.

Width scaling follows RepDistiller exactly: every stage width is ``int(c * width_mult)`` and the
last 1x1 conv keeps 1280 channels unless ``width_mult > 1``. Between the grid's widths the budget
search names any multiplier in steps of 0.01, down to 0.25 (4 channels in the 16-channel stage).
"""

from __future__ import annotations


import torch.nn as nn
from torch import Tensor

from compressor.models._init import repdistiller_init
from compressor.errors import UserError
from compressor.models.registry import WidthScaling, add_model, register_alias, register_pattern, register_scaling

# (expand ratio or None for "use T", output channels, repeats, first stride), RepDistiller's table
_SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)

# widths the budget search enumerates (the MobileNetV2 paper's multipliers plus 0.25)
SEARCH_WIDTHS: tuple[float, ...] = (0.25, 0.35, 0.5, 0.75, 1.0, 1.4)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    """conv -> BN -> ReLU; indices 0/1/2 are RepDistiller's ``conv_bn``/``conv_1x1_bn`` keys."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        # out-of-place add: ``x`` may be a tapped stage map
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """RepDistiller's CIFAR MobileNetV2; forward returns logits only (features come from taps)."""

    # RepDistiller's forward(is_feat=True): f0 = conv1, f1..f4 = blocks 1, 2, 4, 6, f5 = pooled
    stem_name = "conv1"
    stage_names = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
    classifier_name = "classifier.0"

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or int(16 * width_mult) < 1:
            raise UserError(
                f"MobileNetV2 width multiplier {width_mult:g} leaves a stage with no channels; use >= 0.0625"
            )
        if expand_ratio < 1:
            raise UserError(f"MobileNetV2 expand ratio must be >= 1, got {expand_ratio}")
        self.width_mult = width_mult
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio if t is None else t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        repdistiller_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        x = self.avgpool(x).flatten(1)
        return self.classifier(x)


def mobilenetv2(num_classes: int = 100, in_chans: int = 3, width_mult: float = 0.5, expand_ratio: int = 6) -> MobileNetV2:
    """Factory used by the registry (RepDistiller's ``mobilenetv2_T_w(T, W)``)."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, expand_ratio=expand_ratio)


def width_name(width_mult: float) -> str:
    """Concrete name of one grid member, e.g. ``mobilenetv2_w0.5``, ``mobilenetv2_w1``."""
    return f"mobilenetv2_w{width_mult:g}"


for _w in SEARCH_WIDTHS:
    add_model(width_name(_w), mobilenetv2, family="mobilenetv2", searchable=True, width_mult=_w)
register_scaling("mobilenetv2", WidthScaling(
    "width_mult", lambda kw: width_name(kw["width_mult"]), min_width=0.25))
register_alias("MobileNetV2", width_name(0.5))
register_alias("mobile_half", width_name(0.5))  # RepDistiller's own function name
register_pattern(
    r"mobilenetv2_w(\d+(?:\.\d+)?)",
    mobilenetv2,
    family="mobilenetv2",
    parse=lambda m: {"width_mult": float(m.group(1))},
    example="mobilenetv2_w0.6",
)
