"""Data specs -> sources: a registry of ``name[:DIR]`` forms, so adding a format touches one file.

    digits            scikit-learn's bundled 8x8 digits (no files needed)
    fashion-mnist     Fashion-MNIST from the Debian package dataset-fashion-mnist (or fashion-mnist:DIR)
    mnist:DIR         MNIST's IDX files (flat, or torchvision's DIR/MNIST/raw/)
    cifar10:DIR       torchvision's on-disk CIFAR-10  (DIR or DIR/cifar-10-batches-py)
    cifar100:DIR      torchvision's on-disk CIFAR-100 (DIR or DIR/cifar-100-python)
    imagefolder:DIR   DIR/train/<class>/*, DIR/val/<class>/*, optional DIR/test/<class>/*

A source is a module in this package that registers its builder with ``@register_source``; the
package's modules are imported when the registry is first read, so no list names them. A source
also owns its training protocol (:class:`Protocol`: the settings a model of this data trains with
unless a plan says otherwise); one without a protocol trains with the default source's fallback
(:data:`FALLBACK_PROTOCOL`, image folders').

A spec is parsed once, at the edge, into a :class:`DataSpec` (the entry, the directory, the text),
which is what :func:`load_source` and the planner take.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from compressor.data.base import DataSource, SplitOptions
from compressor.data.corruptions import PAPER_IMBALANCE_RATIO, Corruption  # noqa: F401  (re-exported)
from compressor.errors import UserError

# builder(directory or None, spec, options, device, **source_options) -> DataSource
SourceBuilder = Callable[..., DataSource]
FALLBACK_PROTOCOL = "imagefolder"  # the protocol of a source that declares none


@dataclass(frozen=True)
class Protocol:
    """How a model of a source's data is trained unless a plan says otherwise (recipes.protocols).

    ``settings`` are :class:`compressor.trainer.TrainConfig` fields; ``low_lr`` is the learning rate
    of the families the benchmark trains slower (CIFAR: 0.01 for MobileNetV2 and ShuffleNets)."""

    name: str
    settings: Mapping[str, Any]
    low_lr: float | None = None


@dataclass(frozen=True)
class SourceEntry:
    name: str
    needs_dir: bool
    usage: str  # e.g. "cifar10:DIR", "fashion-mnist[:DIR]"
    summary: str
    builder: SourceBuilder
    accepts_dir: bool = False  # True also when the directory is optional (``name[:DIR]``)
    protocol: Protocol | None = None
    rank: int = 100  # place in listings and help (the default source first)

    def takes(self, option: str) -> bool:
        """Whether the builder accepts ``option`` (e.g. ``input_size``) beyond the spec."""
        return option in inspect.signature(self.builder).parameters


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: which source, which directory, and the text the user wrote."""

    text: str
    entry: SourceEntry = field(compare=False)
    directory: Path | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    def __str__(self) -> str:
        return self.text


_SOURCES: dict[str, SourceEntry] = {}


def register_source(name: str, *, needs_dir: bool, summary: str, accepts_dir: bool | None = None,
                    protocol: Protocol | None = None, rank: int = 100) -> Callable[[SourceBuilder], SourceBuilder]:
    """Register a builder for specs of the form ``name``, ``name:DIR`` or, with ``accepts_dir``
    and not ``needs_dir``, both (``name[:DIR]``: the builder gets None without a directory)."""
    accepts = needs_dir or bool(accepts_dir)

    def decorator(builder: SourceBuilder) -> SourceBuilder:
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is registered twice")
        usage = f"{name}:DIR" if needs_dir else f"{name}[:DIR]" if accepts else name
        _SOURCES[name] = SourceEntry(name, needs_dir, usage, summary, builder, accepts, protocol, rank)
        return builder

    return decorator


def list_sources() -> list[SourceEntry]:
    """Every registered source, by rank (the default first), then by name."""
    _ensure_loaded()
    return sorted(_SOURCES.values(), key=lambda e: (e.rank, e.name))


def spec_forms(separator: str = ", ") -> str:
    return separator.join(e.usage for e in list_sources())


def data_help(default: str | None = None) -> str:
    """The ``--data`` option's help: every form a spec takes, from the registry (lazily: a callable
    so building the CLI does not import the sources)."""
    forms = spec_forms(" | ")
    return forms + (f" (default: {default})" if default else "")


def protocol_of(name: str) -> Protocol:
    """The training protocol of source ``name``; a source without one (or an unknown name) gets
    :data:`FALLBACK_PROTOCOL`'s."""
    _ensure_loaded()
    entry = _SOURCES.get(name.strip().lower())
    if entry is not None and entry.protocol is not None:
        return entry.protocol
    return _SOURCES[FALLBACK_PROTOCOL].protocol  # type: ignore[return-value]


def protocols() -> dict[str, Protocol]:
    """Protocol name -> protocol, over every registered source."""
    return {e.protocol.name: e.protocol for e in list_sources() if e.protocol is not None}


def _ensure_loaded() -> None:
    # Import for the registration side effect; kept lazy so `compressor.data` imports cheaply.
    import compressor.data
    from compressor.plugins import import_submodules

    import_submodules(compressor.data.__name__, compressor.data.__path__)


def parse_spec(spec: "str | DataSpec", *, check_dir: bool = True) -> DataSpec:
    """``'cifar100:~/data'`` -> DataSpec(entry cifar100, Path('~/data').expanduser()); UserError on a bad spec.

    ``check_dir=False`` reads a spec whose data will not be opened (a teacher's recorded dataset
    when only its shape is needed) without asking for its directory to exist here."""
    if isinstance(spec, DataSpec):
        return spec
    _ensure_loaded()
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty data spec: expected one of {spec_forms()}")
    name, sep, rest = spec.strip().partition(":")
    entry = _SOURCES.get(name.strip().lower())
    if entry is None:
        raise UserError(f"unknown data spec {spec!r}: expected one of {spec_forms()}")
    if not rest.strip():
        if entry.needs_dir:
            raise UserError(f"data spec {spec!r} names no directory: write {entry.usage!r}")
        return DataSpec(spec.strip(), entry, None)
    if not entry.accepts_dir:
        raise UserError(f"data spec {spec!r}: {entry.name} takes no directory, write just {entry.usage!r}")
    directory = Path(rest.strip()).expanduser()
    if not check_dir:
        return DataSpec(spec.strip(), entry, directory)
    if not directory.exists():
        raise UserError(f"data directory {str(directory)!r} does not exist (from spec {spec!r})")
    if not directory.is_dir():
        raise UserError(f"data path {str(directory)!r} is not a directory (from spec {spec!r})")
    return DataSpec(spec.strip(), entry, directory)


def _check_val_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise UserError(f"val_fraction {val_fraction!r} is outside (0, 1): give the fraction of training data to hold out for validation, e.g. 0.1")


def load_source(
    spec: str | DataSpec,
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
    parsed = parse_spec(spec)
    entry, directory = parsed.entry, parsed.directory
    _check_val_fraction(val_fraction)
    corruption = Corruption.create(label_noise, None if imbalance == 1.0 else imbalance, imbalance_gamma)
    options = SplitOptions(float(val_fraction), int(seed), corruption.label_noise, corruption.imbalance,
                           corruption.imbalance_gamma)
    try:
        return entry.builder(directory, spec=parsed.text, options=options, device=device, **source_options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err) and source_options:
            raise UserError(f"data source {entry.name!r} does not take option(s) {sorted(source_options)}") from None
        raise
