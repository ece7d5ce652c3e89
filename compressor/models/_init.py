"""RepDistiller's weight initialisation, shared by the families that use it (MobileNetV2, VGG)."""

from __future__ import annotations

import math

import torch.nn as nn


def repdistiller_init(model: nn.Module) -> None:
    """Conv N(0, sqrt(2 / (k*k*out))) (He over fan-out), BN weight 1 / bias 0, linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
