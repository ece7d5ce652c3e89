"""Model registry: every architecture is created by name, so plans and checkpoints can name it.

Three kinds of names resolve here:
  * concrete names registered with ``@register_model`` (e.g. ``resnet_d20_w1``);
  * aliases of a concrete name (the KD benchmark names, e.g. ``resnet20``), so checkpoints
    written by RepDistiller/mdistiller keep working under the name they were trained with;
  * parametric patterns (e.g. ``resnet_d<depth>_w<width>``) that build any member of a
    scalable family; the grid of concrete names is what the budget search enumerates.

A scalable family also registers its :class:`WidthScaling`, which lets the budget search name
members between the grid's (e.g. ``resnet_d26_w0.53``) so a student can fill its budget.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from compressor.errors import UserError

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One concrete registered architecture."""

    name: str
    family: str
    factory: ModelFactory
    kwargs: dict[str, Any] = field(default_factory=dict)
    searchable: bool = True  # part of the grid the budget search enumerates


@dataclass(frozen=True)
class PatternEntry:
    """A parametric name: ``regex`` matches the name, ``parse`` turns the match into factory kwargs."""

    regex: re.Pattern[str]
    family: str
    factory: ModelFactory
    parse: Callable[[re.Match[str]], dict[str, Any]]
    example: str


@dataclass(frozen=True)
class WidthScaling:
    """How the budget search may resize a grid member of a family: its width, every other kwarg kept.

    ``width_key`` is the factory kwarg that multiplies the channels; ``name(kwargs)`` is the
    systematic name the family's pattern parses back to exactly those kwargs. Widths the search
    tries are multiples of ``step`` (names stay short; the family rounds channels to whole
    numbers) and at least ``min_width`` (the narrowest layer keeps a few channels).
    """

    width_key: str
    name: Callable[[dict[str, Any]], str]
    min_width: float
    step: float = 0.01


_MODELS: dict[str, ModelEntry] = {}
_SCALINGS: dict[str, WidthScaling] = {}
_ALIASES: dict[str, str] = {}
_PATTERNS: list[PatternEntry] = []
_PREFIXES: dict[str, Callable[[str], ModelEntry]] = {}


def register_model(
    name: str, *, family: str, searchable: bool = True, **fixed_kwargs: Any
) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(num_classes=..., in_chans=..., **fixed_kwargs)`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        add_model(name, factory, family=family, searchable=searchable, **fixed_kwargs)
        return factory

    return decorator


def add_model(
    name: str, factory: ModelFactory, *, family: str, searchable: bool = True, **fixed_kwargs: Any
) -> None:
    """Non-decorator form of :func:`register_model`, for registering a grid in a loop."""
    if name in _MODELS or name in _ALIASES:
        raise ValueError(f"model name {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, family, factory, dict(fixed_kwargs), searchable)


def register_alias(alias: str, target: str) -> None:
    """Make ``alias`` create exactly what ``target`` creates (same state_dict keys)."""
    if alias in _MODELS or alias in _ALIASES:
        raise ValueError(f"model name {alias!r} is registered twice")
    _ALIASES[alias] = target


def register_pattern(
    regex: str,
    factory: ModelFactory,
    *,
    family: str,
    parse: Callable[[re.Match[str]], dict[str, Any]],
    example: str,
) -> None:
    """Register a parametric family name such as ``resnet_d(\\d+)_w([\\d.]+)``."""
    _PATTERNS.append(PatternEntry(re.compile(regex + r"\Z"), family, factory, parse, example))


def register_scaling(family: str, scaling: WidthScaling) -> None:
    """Declare that ``family``'s members may be resized by width (see :class:`WidthScaling`)."""
    if family in _SCALINGS:
        raise ValueError(f"family {family!r} registers its width scaling twice")
    _SCALINGS[family] = scaling


def scaling_of(family: str) -> WidthScaling | None:
    """The family's width scaling, or None for a family of fixed architectures."""
    _ensure_loaded()
    return _SCALINGS.get(family)


def register_prefix(prefix: str, resolver: Callable[[str], ModelEntry]) -> None:
    """Names ``prefix:rest`` are resolved by ``resolver(rest)`` (e.g. ``tv:`` for torchvision)."""
    _PREFIXES[prefix] = resolver


def resolve(name: str) -> ModelEntry:
    """Find the entry for any accepted name, or raise a UserError naming the closest ones."""
    _ensure_loaded()
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix in _PREFIXES:
            return _PREFIXES[prefix](rest)
    target = _ALIASES.get(name, name)
    if target in _MODELS:
        return _MODELS[target]
    for pattern in _PATTERNS:
        match = pattern.regex.match(name)
        if match:
            return ModelEntry(name, pattern.family, pattern.factory, pattern.parse(match), False)
    known = list(_MODELS) + list(_ALIASES)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see `kdcompress zoo`"
    raise UserError(f"unknown model {name!r} ({hint})")


def create(name: str, num_classes: int = 100, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a fresh model by name; ``model.kd_arch``/``kd_arch_kwargs`` remember how."""
    entry = resolve(name)
    model = entry.factory(num_classes=num_classes, in_chans=in_chans, **{**entry.kwargs, **kwargs})
    # what a checkpoint needs to rebuild it: the name and the caller's extra kwargs
    model.kd_arch = name
    model.kd_arch_kwargs = dict(kwargs)
    return model


def list_models(family: str | None = None, *, searchable_only: bool = False, aliases: bool = True) -> list[str]:
    """Names of the concrete models (and aliases), optionally of one family."""
    _ensure_loaded()
    names = [
        e.name
        for e in _MODELS.values()
        if (family is None or e.family == family) and (e.searchable or not searchable_only)
    ]
    if aliases and not searchable_only:
        names += [a for a, t in _ALIASES.items() if family is None or _MODELS[t].family == family]
    return sorted(names)


def aliases_of(name: str) -> list[str]:
    """Benchmark names that point at ``name``."""
    _ensure_loaded()
    return sorted(a for a, t in _ALIASES.items() if t == name)


def canonical_name(name: str) -> str:
    """The concrete name an alias points at (or the name itself)."""
    _ensure_loaded()
    return _ALIASES.get(name, name)


def model_family(name: str) -> str:
    return resolve(name).family


def families() -> list[str]:
    _ensure_loaded()
    return sorted({e.family for e in _MODELS.values()} | {p.family for p in _PATTERNS})


def patterns() -> list[PatternEntry]:
    _ensure_loaded()
    return list(_PATTERNS)


def _ensure_loaded() -> None:
    # Importing the package imports every family module, which registers itself.
    import compressor.models  # noqa: F401
