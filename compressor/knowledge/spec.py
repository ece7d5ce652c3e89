"""The method spec: which knowledge losses a stage trains with, and at what weights.

One string names it all, on the command line and in a plan:

* ``hinton`` or ``hinton+crd``: each term at its loss's ``default_weight`` (the paper's);
* ``hinton:0.9,crd:0.8,ce:1.0``: explicit weights;
* mixed, e.g. ``hinton+crd:0.8`` (``+`` and ``,`` both separate terms).

``ce`` is the cross-entropy weight on the labels, 1.0 unless given. Names are checked against
the loss registry so a typo fails before any training starts.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from compressor.errors import UserError
from compressor.knowledge.base import list_losses, loss_class

CE = "ce"
DEFAULT_CE_WEIGHT = 1.0
ACCEPTED_FORMS = (
    "'hinton', 'hinton+crd' (each term at its paper's weight), "
    "'hinton:0.9,crd:0.8,ce:1.0' (explicit weights; ce is the cross-entropy weight, 1.0 unless given) "
    "or a mix such as 'hinton+crd:0.8'"
)
_SEPARATORS = re.compile(r"[+,]")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class MethodSpec:
    """Knowledge terms with their weights, in the order given, and the cross-entropy weight."""

    terms: tuple[tuple[str, float], ...]
    ce_weight: float = DEFAULT_CE_WEIGHT

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple((str(n), float(w)) for n, w in self.terms))
        object.__setattr__(self, "ce_weight", float(self.ce_weight))

    @classmethod
    def parse(cls, spec: str) -> "MethodSpec":
        return parse_method_spec(spec)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.terms]

    def as_list(self) -> list[tuple[str, float]]:
        """The knowledge terms followed by ``("ce", ce_weight)``."""
        return [*self.terms, (CE, self.ce_weight)]

    def __str__(self) -> str:
        """Explicit form, e.g. ``hinton:0.9,crd:0.8,ce:1``; parses back to an equal spec."""
        return ",".join(f"{name}:{_format_weight(weight)}" for name, weight in self.as_list())


def parse_method(spec: str) -> list[tuple[str, float]]:
    """``(name, weight)`` for each knowledge term in the order given, then ``("ce", weight)``.

    ``ce`` is always the last pair (1.0 unless the spec gives it); every other name is a
    registered knowledge loss (see :func:`compressor.knowledge.build_loss`).
    """
    return parse_method_spec(spec).as_list()


def parse_method_spec(spec: str) -> MethodSpec:
    """Parse a method spec (see the module docstring); a malformed one raises UserError."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"the distillation method is empty; accepted forms: {ACCEPTED_FORMS}")
    known = list_losses()
    terms: list[tuple[str, float]] = []
    ce_weight: float | None = None
    seen: set[str] = set()
    for raw in _SEPARATORS.split(spec):
        name, weight = _parse_term(raw.strip(), spec)
        if name != CE and name not in known:
            everything = [*known, CE]
            close = difflib.get_close_matches(name, everything, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown distillation method {name!r}{hint}; known: {', '.join(everything)}")
        if name in seen:
            raise UserError(f"{name!r} appears twice in the method {spec!r}; give each term once")
        seen.add(name)
        if name == CE:
            ce_weight = DEFAULT_CE_WEIGHT if weight is None else weight
        else:
            terms.append((name, _default_weight(name) if weight is None else weight))
    return MethodSpec(tuple(terms), DEFAULT_CE_WEIGHT if ce_weight is None else ce_weight)


def _parse_term(term: str, spec: str) -> tuple[str, float | None]:
    if not term:
        raise UserError(f"empty term in the method {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    name, colon, weight_text = term.partition(":")
    name = name.strip().lower()
    if not _NAME.fullmatch(name):
        raise UserError(
            f"{term!r} in the method {spec!r} is not a method name (letters, digits, _) with an "
            f"optional :weight; accepted forms: {ACCEPTED_FORMS}"
        )
    if not colon:
        return name, None
    try:
        weight = float(weight_text.strip())
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise UserError(
            f"weight {weight_text.strip()!r} of {name!r} in the method {spec!r} is not a finite "
            f"number >= 0; accepted forms: {ACCEPTED_FORMS}"
        )
    return name, weight


def _default_weight(name: str) -> float:
    return float(loss_class(name).default_weight)


def _format_weight(weight: float) -> str:
    text = repr(float(weight))  # the shortest text that reads back to the same float
    return text[:-2] if text.endswith(".0") else text
