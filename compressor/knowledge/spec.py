"""The method spec: which knowledge losses a stage trains with, and at what weights.

One string names it all, on the command line and in a plan:

* ``hinton`` or ``hinton+crd``: each term at the weight its reference run gives it;
* ``hinton:0.9,crd:0.8,ce:1.0``: explicit weights;
* mixed, e.g. ``hinton+crd:0.8`` (``+`` and ``,`` both separate terms).

``ce`` is the cross-entropy weight on the labels. A term (or ``ce``) named without a weight gets
the weight of the reference protocol for that combination, as RepDistiller's scripts
(scripts/run_cifar_distill.sh; ``-r`` CE, ``-a`` KD, ``-b`` the other term) run it:

* a term alone: its ``default_weight`` (the paper's), CE 1 (``-a 0 -b W``), except where the
  loss sets ``ce_weight_alone``: Hinton KD alone is ``-r 0.1 -a 0.9`` (KD 0.9, CE 0.1);
* a term next to another knowledge term: its ``combined_weight`` where it has one, else its
  ``default_weight``, CE 1: CRD+KD is ``-r 1 -a 1 -b 0.8`` (SemCKD's scripts run ``-a 1`` too).

Weights given explicitly always win. Names are checked against the loss registry so a typo
fails before any training starts. :func:`method_table` lists what every method expands to.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

from compressor.errors import UserError
from compressor.knowledge.base import list_losses, loss_class

CE = "ce"
DEFAULT_CE_WEIGHT = 1.0
ACCEPTED_FORMS = (
    "'hinton', 'hinton+crd' (each term at its reference run's weight), "
    "'hinton:0.9,crd:0.8,ce:1.0' (explicit weights; ce is the cross-entropy weight) "
    "or a mix such as 'hinton+crd:0.8'"
)
_SEPARATORS = re.compile(r"[+,]")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class MethodSpec:
    """Knowledge terms with their weights, in the order given, and the cross-entropy weight."""

    terms: tuple[tuple[str, float], ...]
    ce_weight: float = DEFAULT_CE_WEIGHT
    source: str = field(default="", compare=False)  # what the user wrote, e.g. "hinton+crd" (plans record it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple((str(n), float(w)) for n, w in self.terms))
        object.__setattr__(self, "ce_weight", float(self.ce_weight))

    @classmethod
    def parse(cls, spec: str) -> "MethodSpec":
        return parse_method_spec(spec)

    @property
    def text(self) -> str:
        """What the user wrote, or the explicit form when the spec was built in code."""
        return self.source or str(self)

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


def parse_method_spec(spec: "str | MethodSpec") -> MethodSpec:
    """Parse a method spec (see the module docstring); a malformed one raises UserError. A spec
    already parsed is returned as it is: parse once, at the edge, and pass the value."""
    if isinstance(spec, MethodSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"the distillation method is empty; accepted forms: {ACCEPTED_FORMS}")
    known = list_losses()
    given: list[tuple[str, float | None]] = []
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
            ce_weight = weight
        else:
            given.append((name, weight))
    alone = len(given) == 1
    terms = tuple((name, _default_weight(name, alone) if weight is None else weight) for name, weight in given)
    if ce_weight is None:
        ce_weight = _default_ce_weight(given[0][0]) if alone else DEFAULT_CE_WEIGHT
    return MethodSpec(terms, ce_weight, spec.strip())


def method_table() -> str:
    """A Markdown table of what every method, alone and with Hinton KD, expands to (README's)."""
    rows = ["| method | expands to | phases |", "|---|---|---|"]
    names = list_losses()
    specs = [*names, *(f"hinton+{name}" for name in names if name != "hinton")]
    for text in specs:
        spec = parse_method_spec(text)
        rows.append(f"| `{text}` | `{spec}` | {_phases(spec)} |")
    return "\n".join(rows)


def _phases(spec: MethodSpec) -> str:
    """``one`` or, for a two-stage method, what its init phase trains and what follows it."""
    init = [name for name in spec.names if loss_class(name).init_epochs > 0]
    if not init:
        return "one"
    epochs = max(loss_class(name).init_epochs for name in init)
    rest = [name for name in spec.names if name not in init] + ([CE] if spec.ce_weight else [])
    return f"{'+'.join(init)} alone for {epochs} init epochs, then {'+'.join(rest) or 'nothing'}"


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


def _default_weight(name: str, alone: bool) -> float:
    cls = loss_class(name)
    if not alone and cls.combined_weight is not None:
        return float(cls.combined_weight)
    return float(cls.default_weight)


def _default_ce_weight(name: str) -> float:
    weight = loss_class(name).ce_weight_alone
    return DEFAULT_CE_WEIGHT if weight is None else float(weight)


def _format_weight(weight: float) -> str:
    text = repr(float(weight))  # the shortest text that reads back to the same float
    return text[:-2] if text.endswith(".0") else text
