"""CIFAR ShuffleNetV2 as in RepDistiller/mdistiller ``ShuffleV2`` (Ma et al., 2018).

Module names and ``state_dict`` keys are RepDistiller's (``conv1``, ``bn1``, ``layer<k>.0`` a
DownBlock with ``conv1..5``/``bn1..5``, ``layer<k>.<i>`` BasicBlocks with ``conv1..3``/``bn1..3``,
``conv2``, ``bn2``, ``linear``), so their checkpoints load unchanged. ``ShuffleV2`` is net size 1.

Departures, none of which adds or renames a parameter:
  * the stem conv takes ``in_chans`` channels;
  * RepDistiller's ``F.avg_pool2d(out, 4)`` (1x1 only at 32x32) is an ``AdaptiveAvgPool2d(1)``;
  * the stem's ReLU and the head's ReLU are modules (``stem_relu``, ``head_relu``) so RepDistiller's
    ``f0`` can be tapped;
  * the last block of a stage returns only its output (no pre-ReLU map).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.errors import UserError
from compressor.models.registry import add_model, register_alias, register_pattern

STEM_CHANNELS = 24

# net size -> (stage widths + head width, BasicBlocks per stage); RepDistiller's standard sizes
CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


def _shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Channel shuffle with 2 groups (a module, as in RepDistiller; it holds no parameters)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return _shuffle(x, self.groups)


class BasicBlock(nn.Module):
    """Split channels in half; 1x1 -> depthwise 3x3 -> 1x1 on one half; concatenate; shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        c = int(x.shape[1] * self.split_ratio)
        keep, work = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(work)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([keep, out], 1))


class DownBlock(nn.Module):
    """Both branches see the whole input at stride 2; each makes half the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """1x1 stem, three stages (DownBlock + BasicBlocks), 1x1 head conv, pooled linear classifier."""

    stem_name = "stem_relu"
    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "linear"

    def __init__(self, num_classes: int = 100, in_chans: int = 3, net_size: float = 1.0) -> None:
        super().__init__()
        if float(net_size) not in CONFIGS:
            sizes = ", ".join(f"{s:g}" for s in CONFIGS)
            raise UserError(f"ShuffleNetV2 net size {net_size:g} is not defined; use one of {sizes}")
        self.net_size = float(net_size)
        widths, repeats = CONFIGS[self.net_size]
        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.stem_relu = nn.ReLU()
        channels = STEM_CHANNELS
        for k in range(3):
            blocks = [DownBlock(channels, widths[k])] + [BasicBlock(widths[k]) for _ in range(repeats[k])]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            channels = widths[k]
        self.conv2 = nn.Conv2d(channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.head_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.head_relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


def shufflev2(num_classes: int = 100, in_chans: int = 3, net_size: float = 1.0) -> ShuffleNetV2:
    """Factory used by the registry (RepDistiller's ``ShuffleNetV2(net_size)``)."""
    return ShuffleNetV2(num_classes=num_classes, in_chans=in_chans, net_size=net_size)


def _standard_size(text: str) -> float:
    size = float(text)
    if size not in CONFIGS:
        sizes = ", ".join(size_name(s) for s in CONFIGS)
        raise UserError(f"ShuffleNetV2 has no net size {size:g}; use one of {sizes}")
    return size


def size_name(net_size: float) -> str:
    """Concrete name of one standard size, e.g. ``shufflev2_w0.5``, ``shufflev2_w1``."""
    return f"shufflev2_w{net_size:g}"


for _size in CONFIGS:
    add_model(size_name(_size), shufflev2, family="shufflenetv2", searchable=True, net_size=_size)
register_alias("ShuffleV2", size_name(1.0))
# spellings such as ``shufflev2_w1.0`` resolve to the same size; undefined sizes get a clear error
register_pattern(
    r"shufflev2_w(\d+(?:\.\d+)?)",
    shufflev2,
    family="shufflenetv2",
    parse=lambda m: {"net_size": _standard_size(m.group(1))},
    example="shufflev2_w1.0",
)
