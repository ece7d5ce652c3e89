"""Data specs -> sources: a registry of ``name[:DIR]`` forms, so adding a format touches one file.

    digits            scikit-learn's bundled 8x8 digits (no files needed)
    fashion-mnist     Fashion-MNIST from the Debian package dataset-fashion-mnist (or fashion-mnist:DIR)
    mnist:DIR         MNIST's IDX files (flat, or torchvision's DIR/MNIST/raw/)
    cifar10:DIR       torchvision's on-disk CIFAR-10  (DIR or DIR/cifar-10-batches-py)
    cifar100:DIR      torchvision's on-disk CIFAR-100 (DIR or DIR/cifar-100-python)
    imagefolder:DIR   DIR/train/<class>/*, DIR/val/<class>/*, optional DIR/test/<class>/*
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from compressor.data.base import DataSource, SplitOptions
from compressor.data.corruptions import PAPER_IMBALANCE_RATIO, Corruption  # noqa: F401  (re-exported)
from compressor.errors import UserError

# builder(directory or None, spec, options, device, **source_options) -> DataSource
SourceBuilder = Callable[..., DataSource]


@dataclass(frozen=True)
class SourceEntry:
    name: str
    needs_dir: bool
    usage: str  # e.g. "cifar10:DIR", "fashion-mnist[:DIR]"
    summary: str
    builder: SourceBuilder
    accepts_dir: bool = False  # True also when the directory is optional (``name[:DIR]``)


_SOURCES: dict[str, SourceEntry] = {}


def register_source(name: str, *, needs_dir: bool, summary: str,
                    accepts_dir: bool | None = None) -> Callable[[SourceBuilder], SourceBuilder]:
    """Register a builder for specs of the form ``name``, ``name:DIR`` or, with ``accepts_dir``
    and not ``needs_dir``, both (``name[:DIR]``: the builder gets None without a directory)."""
    accepts = needs_dir or bool(accepts_dir)

    def decorator(builder: SourceBuilder) -> SourceBuilder:
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is registered twice")
        usage = f"{name}:DIR" if needs_dir else f"{name}[:DIR]" if accepts else name
        _SOURCES[name] = SourceEntry(name, needs_dir, usage, summary, builder, accepts)
        return builder

    return decorator


BUILTIN_ORDER = ("digits", "cifar10", "cifar100", "fashion-mnist", "mnist", "imagefolder")


def list_sources() -> list[SourceEntry]:
    """Built-in sources in a fixed order (the default first), whatever imported them first; then the others."""
    _ensure_builtin()
    rank = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    return sorted(_SOURCES.values(), key=lambda e: rank.get(e.name, len(rank)))


def spec_forms() -> str:
    return ", ".join(e.usage for e in list_sources())


def _ensure_builtin() -> None:
    # Import for the registration side effect; kept lazy so `compressor.data` imports cheaply.
    from compressor.data import digits  # noqa: F401  (first: the default source)
    from compressor.data import cifar, idx, imagefolder  # noqa: F401


def parse_spec(spec: str) -> tuple[SourceEntry, Path | None]:
    """``'cifar100:~/data'`` -> (entry, Path('~/data').expanduser()); UserError on a bad spec."""
    _ensure_builtin()
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty data spec: expected one of {spec_forms()}")
    name, sep, rest = spec.strip().partition(":")
    entry = _SOURCES.get(name.strip().lower())
    if entry is None:
        raise UserError(f"unknown data spec {spec!r}: expected one of {spec_forms()}")
    if not rest.strip():
        if entry.needs_dir:
            raise UserError(f"data spec {spec!r} names no directory: write {entry.usage!r}")
        return entry, None
    if not entry.accepts_dir:
        raise UserError(f"data spec {spec!r}: {entry.name} takes no directory, write just {entry.usage!r}")
    directory = Path(rest.strip()).expanduser()
    if not directory.exists():
        raise UserError(f"data directory {str(directory)!r} does not exist (from spec {spec!r})")
    if not directory.is_dir():
        raise UserError(f"data path {str(directory)!r} is not a directory (from spec {spec!r})")
    return entry, directory


def _check_val_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise UserError(f"val_fraction {val_fraction!r} is outside (0, 1): give the fraction of training data to hold out for validation, e.g. 0.1")


def load_source(
    spec: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    label_noise: float = 0.0,
    imbalance: float = 1.0,
    device: str | torch.device = "cpu",
    imbalance_gamma: float | None = None,
    **source_options: Any,
) -> DataSource:
    """Open the data named by ``spec`` with a seeded val hold-out and optional training corruptions.

    ``label_noise`` is the symmetric noise rate sigma in [0, 1); ``imbalance`` the max/min class
    ratio rho >= 1 (1 = balanced); ``imbalance_gamma`` switches the imbalance profile from the
    exponential long tail to the paper's power law (see :mod:`compressor.data.corruptions`); given
    alone (rho left at 1) it uses the paper's CIFAR-10 ratio, rho = 20 (5000 down to 250 per class).
    ``source_options`` go to the source (image folders: ``input_size``, ``num_workers``, ``crop_fraction``;
    Fashion-MNIST and MNIST: ``train_limit``).
    """
    entry, directory = parse_spec(spec)
    _check_val_fraction(val_fraction)
    corruption = Corruption.create(label_noise, None if imbalance == 1.0 else imbalance, imbalance_gamma)
    options = SplitOptions(float(val_fraction), int(seed), corruption.label_noise, corruption.imbalance,
                           corruption.imbalance_gamma)
    try:
        return entry.builder(directory, spec=spec.strip(), options=options, device=device, **source_options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err) and source_options:
            raise UserError(f"data source {entry.name!r} does not take option(s) {sorted(source_options)}") from None
        raise
