"""Schemes by name, so the CLI and the planner build any of them from one request.

Adding a scheme is one module with ``@register_scheme("name")`` on a builder function.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from compressor.errors import UserError
from compressor.schemes.base import Scheme


@dataclass
class SchemeRequest:
    """Everything a builder may need; builders ignore what they do not use."""

    student_arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    num_train: int  # training-split size (CRD and OSAKD size their memories from it)
    teacher: nn.Module | None = None  # frozen, already loaded
    method: str | None = None  # knowledge method spec, e.g. "hinton+crd" or "hinton:0.9,crd:0.8,ce:1.0"
    options: dict[str, Any] = field(default_factory=dict)  # scheme-specific: cohort size, aggregator, k...


SchemeBuilder = Callable[[SchemeRequest], Scheme]
_SCHEMES: dict[str, SchemeBuilder] = {}


def register_scheme(name: str) -> Callable[[SchemeBuilder], SchemeBuilder]:
    def decorator(builder: SchemeBuilder) -> SchemeBuilder:
        if name in _SCHEMES:
            raise ValueError(f"scheme {name!r} registered twice")
        _SCHEMES[name] = builder
        return builder

    return decorator


def build_scheme(name: str, request: SchemeRequest) -> Scheme:
    _ensure_loaded()
    if name not in _SCHEMES:
        close = difflib.get_close_matches(name, list(_SCHEMES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown scheme {name!r}{hint}; known: {', '.join(list_schemes())}")
    return _SCHEMES[name](request)


def list_schemes() -> list[str]:
    _ensure_loaded()
    return sorted(_SCHEMES)


def _ensure_loaded() -> None:
    import compressor.schemes  # noqa: F401
