"""torchvision classification models under the ``tv:`` prefix, e.g. ``tv:mobilenet_v3_small``.

``create("tv:resnet18", num_classes=10, in_chans=1)`` builds torchvision's model with
``weights=None`` (nothing is ever downloaded), the classifier sized by the constructor's own
``num_classes`` and, where ``in_chans != 3``, the first convolution rebuilt for ``in_chans``.
These models declare no stages: :class:`compressor.features.FeatureTaps` finds them by a dry run.

ImageNet models downsample 32x and end in adaptive pooling, so most of them run on 8x8 inputs
(ResNets, MobileNets, ShuffleNetV2, EfficientNets, RegNets, MNASNet, Swin). Some cannot: fixed
pooling windows need a minimum side, and ViT/MaxViT are built for one input size. For those a
forward pre-hook raises a :class:`UserError` naming the size they need instead of a shape error
from deep inside torch. The minimum sides were measured with torchvision 0.29 (smallest side that
runs, checked by bisection on zero inputs).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from typing import Any

import torch
import torch.nn as nn

from compressor.errors import UserError
from compressor.models.registry import ModelEntry, register_prefix

PREFIX = "tv"
FAMILY = "torchvision"

# name pattern -> smallest input side that runs (measured, see module docstring)
MIN_SIDE: tuple[tuple[str, int], ...] = (
    (r"alexnet", 63),
    (r"inception_v3", 75),
    (r"vgg\d+(_bn)?", 32),
    (r"convnext_\w+", 32),
    (r"densenet\d+", 29),
    (r"squeezenet1_0", 21),
    (r"squeezenet1_1", 17),
    (r"googlenet", 15),
)
# models built for exactly one input size: (name pattern, attribute holding it, constructor kwarg)
FIXED_SIZE: tuple[tuple[str, str, str], ...] = (
    (r"vit_\w+", "image_size", "image_size"),
    (r"maxvit_\w+", "kd_input_size", "input_size"),
)
# constructor defaults that change what forward returns or warn on every build
_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@functools.lru_cache(maxsize=1)
def classification_names() -> tuple[str, ...]:
    """torchvision's classification builders (not detection/segmentation/video/quantized)."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def resolve_tv(arch: str) -> ModelEntry:
    """Registry resolver for ``tv:<arch>``: unknown names get the closest torchvision names."""
    names = classification_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(f'{PREFIX}:{c}' for c in close)}" if close else (
            "list them with torchvision.models.list_models(module=torchvision.models)"
        )
        raise UserError(f"unknown torchvision classification model {arch!r} ({hint})")
    return ModelEntry(f"{PREFIX}:{arch}", FAMILY, functools.partial(build_torchvision, arch), {}, False)


def build_torchvision(arch: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build ``arch`` untrained for ``num_classes`` outputs and ``in_chans`` input channels."""
    import torchvision.models as tvm

    if kwargs.pop("weights", None) is not None:
        raise UserError("pretrained torchvision weights are never downloaded; load a checkpoint instead")
    kwargs = {**_DEFAULT_KWARGS.get(arch, {}), **kwargs}
    try:
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        if "num_classes" not in str(err):
            raise UserError(f"tv:{arch} does not accept these options: {err}") from None
        model = tvm.get_model(arch, weights=None, **kwargs)
        _replace_last_linear(model, num_classes)
    if in_chans != 3:
        adapt_first_conv(model, in_chans)
    if arch.startswith("maxvit"):
        size = kwargs.get("input_size", (224, 224))
        model.kd_input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    _install_input_check(model, arch)
    return model


def adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Rebuild the first RGB convolution for ``in_chans`` channels, same geometry.

    The new weights are drawn with the old weights' standard deviation scaled by sqrt(3 / in_chans),
    so each output keeps the variance the model's own initialisation intended (it sums
    ``in_chans`` instead of 3 input channels). The bias, if any, is kept.
    """
    if in_chans < 1:
        raise UserError(f"in_chans must be >= 1, got {in_chans}")
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(
                in_chans,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            ).to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                std = float(module.weight.std()) * math.sqrt(3.0 / in_chans)
                new.weight.normal_(0.0, std if std > 0 else 1e-2)
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return
    raise UserError(f"{type(model).__name__} has no 3-channel input convolution to adapt to {in_chans} channels")


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """For a constructor without ``num_classes``: resize its last ``nn.Linear``."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier to resize to {num_classes} classes")
    name, linear = last
    parent_name, _, attr = name.rpartition(".")
    new = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None)
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


class InputSizeCheck:
    """Forward pre-hook turning "this model cannot take this input size" into one clear UserError.

    A class rather than a closure so a hooked model still pickles and deep-copies cleanly.
    """

    def __init__(self, arch: str, minimum: int | None, fixed: tuple[str, str] | None) -> None:
        self.arch = arch
        self.minimum = minimum
        self.fixed = fixed  # (attribute holding the built size, constructor kwarg setting it)

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        h, w = (int(s) for s in inputs[0].shape[-2:])
        if self.minimum is not None and min(h, w) < self.minimum:
            raise UserError(
                f"tv:{self.arch} needs inputs of at least {self.minimum}x{self.minimum} (fixed pooling "
                f"windows), got {h}x{w}: resize the data or pick a model that takes small inputs (e.g. tv:resnet18)"
            )
        if self.fixed is not None:
            size = getattr(module, self.fixed[0])
            want = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            if (h, w) != want:
                value = h if h == w else (h, w)
                raise UserError(
                    f"tv:{self.arch} is built for {want[0]}x{want[1]} inputs, got {h}x{w}: "
                    f"create it with {self.fixed[1]}={value}"
                )


def _install_input_check(model: nn.Module, arch: str) -> None:
    minimum = next((side for pattern, side in MIN_SIDE if re.fullmatch(pattern, arch)), None)
    fixed = next(((attr, kwarg) for pattern, attr, kwarg in FIXED_SIZE if re.fullmatch(pattern, arch)), None)
    if minimum is not None or fixed is not None:
        model.register_forward_pre_hook(InputSizeCheck(arch, minimum, fixed))


register_prefix(PREFIX, resolve_tv)
