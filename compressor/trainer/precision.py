"""Mixed precision and memory format: how fast, never what is computed in principle.

On CUDA, autocast runs convolutions and matmuls in bf16 where the GPU supports it (no loss
scaling needed) and fp16 with a gradient scaler otherwise; channels_last lets cuDNN use tensor
cores for convolutions without transposes. On CPU all of it is off: fp32, contiguous tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn as nn

from compressor.trainer.config import TrainConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active for fp16 only (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_module(self, module: nn.Module) -> nn.Module:
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(config: TrainConfig, device: torch.device, module: nn.Module) -> Precision:
    cuda = device.type == "cuda"
    if config.amp == "off" or not cuda:
        dtype = None
    elif config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
    if config.channels_last == "auto":
        channels_last = cuda and has_conv
    else:
        channels_last = config.channels_last == "on" and has_conv
    return Precision(device, dtype, channels_last)
