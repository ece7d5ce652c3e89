"""Mixed precision and memory format: how fast, never what is computed in principle.

On CUDA, autocast runs convolutions and matmuls in bf16 where the GPU supports it (no loss
scaling needed) and fp16 with a gradient scaler otherwise; channels_last lets cuDNN use tensor
cores for convolutions without transposes. On CPU the arithmetic stays fp32; channels_last is on
for conv nets unless one of them has a convolution it makes slower (:func:`slow_conv_on_cpu`).
A format changes results by float rounding only, not bit for bit (tests/test_memory_format.py);
a run and its resumption make the same choice from the same settings and models.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ContextManager, Iterable, Sequence

import torch
import torch.nn as nn

from compressor.probe import hooked_forward
from compressor.trainer.config import TrainConfig

# A convolution on which channels_last is slower on CPU: a spatial kernel (3x3 or larger) over at
# least WIDE_CONV_CHANNELS input channels per group, whose output map has at most SMALL_MAP_PIXELS.
WIDE_CONV_CHANNELS = 256
SMALL_MAP_PIXELS = 16  # 4x4


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool
    reason: str = ""  # why this memory format (shown in the run's log)

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

    def line(self) -> str:
        """The choice as the run's log says it, e.g. ``precision: fp32, channels_last (auto: ...)``."""
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"precision: {self.name}, {layout}" + (f" ({self.reason})" if self.reason else "")


def resolve_precision(config: TrainConfig, device: torch.device, module: nn.Module,
                      input_shape: Sequence[int] | None = None) -> Precision:
    """AMP dtype and memory format for training ``module`` (a scheme, or one model) on ``device``.

    ``channels_last: on|off`` is obeyed for any net with a Conv2d (it means nothing without one).
    ``auto`` turns it on for conv nets on CUDA, and on CPU for conv nets in which no model that
    sees the images (``input_shape``, C x H x W) has a :func:`slow_conv_on_cpu`; on CPU without
    ``input_shape`` it stays off.

    Why (``benchmarks/memory_format.py``: torch 2.14 on a Xeon with AVX-512 and AMX, fp32, 1 thread,
    training images/s channels_last / contiguous, median of 5): oneDNN computes convolutions in
    blocked layouts and reorders NCHW tensors to them and back at every conv; from channels_last it
    reorders less. ResNets gain 15-24% on digits (1x8x8: resnet8 1.16, resnet110 1.15,
    resnet_d26_w0.53 1.24, resnet110 -> resnet_d26_w0.53 KD 1.17), Fashion-MNIST (1x28x28: resnet20
    1.23) and CIFAR (3x32x32 KD: resnet56 -> resnet20 1.23, SemCKD 1.24, wrn_40_2 -> wrn_16_2 1.21,
    resnet32x4 -> ShuffleV2 1.12); depthwise nets more (tv:mobilenet_v2 at 64x64 1.41); evaluation
    less (1.03-1.29); tv:resnet18 at 224x224, whose wide convs run on 7x7-14x14 maps, 1.19. It loses
    where 3x3 convs of 256-512 channels run on maps of 4x4 or smaller (one such conv alone takes
    1.2-1.6x the time at 256 channels, 1.35-1.8x at 512): digits resnet32x4 0.94 and vgg8 0.95,
    CIFAR vgg13 -> vgg8 0.94, tv:resnet18 at 64x64 0.89. The rule keeps those contiguous, and two
    nets that gain a little with them (CIFAR ResNet18 1.08, vgg13 -> MobileNetV2 1.13): it turns
    channels_last on for no net measured slower.
    """
    cuda = device.type == "cuda"
    if config.amp == "off" or not cuda:
        dtype = None
    elif config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
    if not has_conv:
        channels_last, reason = False, "no conv layers"
    elif config.channels_last != "auto":
        channels_last, reason = config.channels_last == "on", f"channels_last: {config.channels_last}"
    elif cuda:
        channels_last, reason = True, "auto: conv net on CUDA"
    elif input_shape is None:
        channels_last, reason = False, "auto: input size unknown on CPU"
    else:
        slow = slow_conv_on_cpu(_image_models(module), tuple(input_shape))
        channels_last = slow is None
        reason = "auto: conv net on CPU" if slow is None else f"auto on CPU: {slow}"
    return Precision(device, dtype, channels_last, reason)


def _image_models(module: nn.Module) -> list[nn.Module]:
    """The models of a scheme that take the images (evaluated ones and frozen teachers), or the module."""
    if hasattr(module, "eval_models") and hasattr(module, "frozen_modules"):
        models = [*module.eval_models().values(), *module.frozen_modules()]
        return list({id(m): m for m in models}.values())
    return [module]


def slow_conv_on_cpu(models: Iterable[nn.Module], input_shape: tuple[int, ...]) -> str | None:
    """Why channels_last would be slower on CPU for ``models``, or None: the first Conv2d of theirs
    that it slows (``conv 512->512 3x3 on 2x2 maps is slower in channels_last``), found by one batch-1
    forward in eval mode without gradients (no state changes). A model that cannot run on zeros of
    ``input_shape`` counts too: the format cannot be judged, and contiguous is the safe side."""
    found: list[str] = []

    def hook(conv: nn.Conv2d, args, output) -> None:
        pixels = math.prod(output.shape[-2:])
        if (not found and conv.in_channels // conv.groups >= WIDE_CONV_CHANNELS
                and max(conv.kernel_size) > 1 and pixels <= SMALL_MAP_PIXELS):
            found.append(f"conv {conv.in_channels}->{conv.out_channels} "
                         f"{'x'.join(map(str, conv.kernel_size))} on {'x'.join(map(str, output.shape[-2:]))} maps "
                         "is slower in channels_last")

    for model in models:
        if not hooked_forward(model, input_shape, hook, (nn.Conv2d,)):
            found.append(f"{type(model).__name__} does not run on {'x'.join(map(str, input_shape))} zeros to check")
        if found:
            return found[0]
    return None
