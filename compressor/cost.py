"""FLOPs and parameters, measured with fvcore, never guessed.

Convention (fvcore's): one fused multiply-add counts as ONE FLOP. Convolutions, linear layers,
batch norm and pooling are counted; element-wise ops fvcore has no rule for (residual ``add``,
activations) are not, and are reported in ``Cost.uncounted`` rather than silently dropped.
With this convention CIFAR ResNet-20 (3x32x32, 100 classes) is 41.2 MFLOPs, ResNet-110 255.3 M.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from compressor.atomic import write_text
from compressor.errors import UserError
from compressor.threads import one_thread

FLOP_CONVENTION = "1 FLOP = 1 fused multiply-add (fvcore convention)"


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int
    input_shape: tuple[int, ...]
    uncounted: dict[str, int] = field(default_factory=dict)  # op name -> occurrences fvcore skipped

    @property
    def mflops(self) -> float:
        return self.flops / 1e6

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> Cost:
    """Count one forward of a single sample in eval mode; the model's mode and weights are kept."""
    with warnings.catch_warnings():  # importing fvcore touches torch.jit.script, which warns
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    shape = tuple(int(s) for s in input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, (torch.zeros(1, *shape, device=device),))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        with warnings.catch_warnings(), _quiet_fvcore(), one_thread():
            warnings.simplefilter("ignore")
            flops = int(analysis.total())
            uncounted = dict(Counter(analysis.unsupported_ops()))
    finally:
        model.train(was_training)
    return Cost(flops, count_params(model), shape, uncounted)


@functools.lru_cache(maxsize=4096)
def measure_arch(name: str, num_classes: int, input_shape: tuple[int, ...]) -> Cost:
    """Cost of a zoo architecture by name, cached in memory and on disk (the search asks for many).

    The disk cache key includes a digest of the source file that defines the architecture, so
    editing a model family invalidates its figures.
    """
    from compressor.models import create, resolve

    shape = tuple(int(s) for s in input_shape)
    key = f"{name}|{num_classes}|{'x'.join(map(str, shape))}|{_source_digest(resolve(name).factory)}"
    cache = _DiskCache.default()
    hit = cache.get(key)
    if hit is not None:
        return Cost(int(hit["flops"]), int(hit["params"]), shape, dict(hit["uncounted"]))
    cost = measure(create(name, num_classes=num_classes, in_chans=shape[0]), shape)
    cache.put(key, {"flops": cost.flops, "params": cost.params, "uncounted": cost.uncounted})
    return cost


def _source_digest(obj: object) -> str:
    try:
        source = Path(inspect.getsourcefile(obj) or "").read_bytes()
    except (TypeError, OSError):
        return "nosource"
    return hashlib.sha1(source).hexdigest()[:12]


class _DiskCache:
    """A JSON file of measured costs; ``KDCOMPRESS_CACHE`` moves it, ``off`` disables it."""

    _instances: dict[str, "_DiskCache"] = {}

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict] | None = None

    @classmethod
    def default(cls) -> "_DiskCache":
        where = os.environ.get("KDCOMPRESS_CACHE")
        if where == "off":
            path = None
        else:
            base = Path(where) if where else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdcompress"
            path = base / "cost-cache.json"
        key = str(path)
        if key not in cls._instances:
            cls._instances[key] = cls(path)
        return cls._instances[key]

    def _load(self) -> dict[str, dict]:
        if self.data is None:
            self.data = {}
            if self.path is not None and self.path.exists():
                try:
                    data = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    data = {}
                self.data = data if isinstance(data, dict) else {}  # a damaged cache is only a slower search
        return self.data

    def get(self, key: str) -> dict | None:
        return self._load().get(key)

    def put(self, key: str, value: dict) -> None:
        data = self._load()
        data[key] = value
        if self.path is None:
            return
        try:
            write_text(self.path, json.dumps(data))
        except (OSError, UserError):
            pass  # read-only home or a full disk: the in-memory cache still serves this process


class _quiet_fvcore:
    """fvcore logs every op it skips; the skipped ops are returned in ``Cost.uncounted`` instead."""

    def __enter__(self):
        self._logger = logging.getLogger("fvcore")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def format_flops(flops: int) -> str:
    """Human figure with its unit and convention marker, e.g. ``41.2 MFLOPs``."""
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "KFLOPs")):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops} FLOPs"


def format_params(params: int) -> str:
    for scale, unit in ((1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3f} {unit} params" if unit == "M" else f"{params / scale:.1f} K params"
    return f"{params} params"
