"""Budgets a user can give: FLOPs, parameters, batch-1 latency, or a compression factor.

Accepted forms (case-insensitive, spaces optional, ``--budget`` repeatable; all must hold):
  * FLOPs:      ``0.1GFLOPs``, ``100MFLOPs``, ``100M FLOPs``, ``2e6 flops``  (1 multiply-add = 1 FLOP)
  * parameters: ``1.5Mparams``, ``300K params``, ``250000 params``
  * latency:    ``5ms``, ``800us``, ``0.005s``  (batch 1, onnxruntime, on this machine)
  * factor:     ``10x`` (at most 1/10 of the teacher's FLOPs)

Each kind is a :class:`BudgetKind` in a registry (``@register_budget_kind``): how it reads, what it
says, and what it limits (a measured cost, ``"flops"`` or ``"params"``, or a timed latency). The
search, the pruned candidate, the report's budget lines and the CLI's help all ask the kind, so a
new kind is one class (in this file or in any module imported before parsing) plus its tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

from compressor.errors import UserError

_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"


class BudgetKind:
    """One way of writing a budget. Subclass, set the class attributes, register.

    ``pattern`` matches the compact text (lower case, no spaces or underscores); ``value`` turns
    the match into the kind's unit; ``metric`` names the measured cost it caps (``"flops"``,
    ``"params"``) or is None; ``timed`` kinds are measured on this machine, never estimated.
    """

    name: ClassVar[str] = ""
    pattern: ClassVar[re.Pattern[str]]
    examples: ClassVar[tuple[str, ...]] = ()  # for the accepted-forms line and the CLI's help
    help: ClassVar[str] = ""  # the CLI's words for this kind, e.g. "params (1.5Mparams, 300K params)"
    metric: ClassVar[str | None] = None
    timed: ClassVar[bool] = False

    def value(self, match: re.Match[str]) -> float:
        return float(match["num"])

    def problem(self, value: float) -> str | None:
        """What is wrong with an amount that reads well (None: nothing)."""
        return None if value > 0 else "a positive amount"

    def describe(self, value: float) -> str:
        raise NotImplementedError

    def ceiling(self, value: float, teacher_flops: int | None, text: str) -> float | None:
        """The cap on ``metric`` this budget sets (None for a kind without a metric)."""
        return value if self.metric else None

    def limit_text(self, value: float, text: str) -> str:
        """How the plan names this budget when it says how much of it a student uses."""
        return self.describe(value)


_KINDS: dict[str, BudgetKind] = {}


def register_budget_kind(cls: type[BudgetKind]) -> type[BudgetKind]:
    if cls.name in _KINDS:
        raise ValueError(f"budget kind {cls.name!r} registered twice")
    _KINDS[cls.name] = cls()
    return cls


def budget_kinds() -> list[BudgetKind]:
    return list(_KINDS.values())


def accepted_forms() -> str:
    return "e.g. " + ", ".join(e for k in _KINDS.values() for e in k.examples)


def budget_help() -> str:
    """The ``--budget`` option's help, from the registered kinds."""
    helps = [k.help for k in _KINDS.values()]
    return "repeatable, all must hold: " + ", ".join(helps[:-1]) + (", or " if len(helps) > 1 else "") + helps[-1]


class CountBudget(BudgetKind):
    """A ceiling on a measured count (``<number><k|m|g|t><word>``), said in millions of ``unit``."""

    unit: ClassVar[str] = ""

    def value(self, match: re.Match[str]) -> float:
        return float(match["num"]) * _SCALE[match["scale"]]

    def describe(self, value: float) -> str:
        return f"<= {value / 1e6:g} {self.unit}"


@register_budget_kind
class FlopsBudget(CountBudget):
    name, metric, unit = "flops", "flops", "MFLOPs"
    pattern = re.compile(rf"{_NUMBER}(?P<scale>[kmgt]?)flops?")
    examples = ("0.1GFLOPs", "100M FLOPs")
    help = "FLOPs (0.1GFLOPs, 100M FLOPs; 1 multiply-add = 1 FLOP, fvcore)"


@register_budget_kind
class ParamsBudget(CountBudget):
    name, metric, unit = "params", "params", "M params"
    pattern = re.compile(rf"{_NUMBER}(?P<scale>[kmgt]?)params?")
    examples = ("1.5Mparams", "300K params")
    help = "params (1.5Mparams, 300K params)"


@register_budget_kind
class LatencyBudget(BudgetKind):
    name, timed = "latency", True
    pattern = re.compile(rf"{_NUMBER}(?P<unit>ms|us|µs|s)")
    examples = ("5ms",)
    help = "batch-1 latency on this machine (5ms)"
    _UNIT: ClassVar[dict[str, float]] = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}

    def value(self, match: re.Match[str]) -> float:
        return float(match["num"]) * self._UNIT[match["unit"]]

    def describe(self, value: float) -> str:
        return f"<= {value:g} ms at batch 1"


@register_budget_kind
class FactorBudget(BudgetKind):
    name, metric = "factor", "flops"
    pattern = re.compile(rf"{_NUMBER}x")
    examples = ("10x",)
    help = "a factor of the teacher's FLOPs (10x)"

    def problem(self, value: float) -> str | None:
        return None if value > 1 else "a factor above 1"

    def describe(self, value: float) -> str:
        return f">= {value:g}x fewer FLOPs than the teacher"

    def ceiling(self, value: float, teacher_flops: int | None, text: str) -> float | None:
        if teacher_flops is None:
            raise UserError(f"budget {text!r} is relative to the teacher: give --teacher")
        return teacher_flops / value

    def limit_text(self, value: float, text: str) -> str:
        return f"the FLOPs {text!r} allows"


@dataclass(frozen=True)
class Budget:
    kind: str  # a registered kind: "flops" | "params" | "latency" | "factor" | ...
    value: float  # in the kind's unit: FLOPs, parameters, milliseconds, the factor
    text: str  # what the user wrote

    @property
    def spec(self) -> BudgetKind:
        return _KINDS[self.kind]

    @property
    def metric(self) -> str | None:
        """The measured cost this budget caps (``"flops"``, ``"params"``), or None (latency)."""
        return self.spec.metric

    @property
    def timed(self) -> bool:
        return self.spec.timed

    def describe(self) -> str:
        return self.spec.describe(self.value)

    def limit_text(self) -> str:
        return self.spec.limit_text(self.value, self.text)

    def ceiling(self, teacher_flops: int | None) -> float | None:
        """The cap on :attr:`metric` (None for a budget that caps no measured cost)."""
        return self.spec.ceiling(self.value, teacher_flops, self.text)

    def flops_limit(self, teacher_flops: int | None) -> float | None:
        """The FLOPs ceiling this budget implies (None if it says nothing about FLOPs)."""
        return self.ceiling(teacher_flops) if self.metric == "flops" else None


def parse_budget(text: str) -> Budget:
    """One budget string -> Budget; anything else is a UserError listing the accepted forms."""
    compact = text.strip().lower().replace(" ", "").replace("_", "")
    for kind in _KINDS.values():
        match = kind.pattern.fullmatch(compact)
        if not match:
            continue
        value = kind.value(match)
        need = kind.problem(value)
        if need:
            raise UserError(f"budget {text!r} must be {need} ({accepted_forms()})")
        return Budget(kind.name, value, text.strip())
    raise UserError(f"cannot read budget {text!r}; accepted forms: {accepted_forms()}")


def parse_budgets(texts: Sequence[str]) -> tuple[Budget, ...]:
    if not texts:
        raise UserError(f"give at least one --budget ({accepted_forms()})")
    return tuple(parse_budget(t) for t in texts)


def cost_limits(budgets: Sequence[Budget], teacher_flops: int | None) -> list[tuple[str, str, float]]:
    """(budget text, metric, ceiling) of every budget a measured cost can break."""
    out = []
    for b in budgets:
        limit = b.ceiling(teacher_flops)
        if limit is not None and b.metric:
            out.append((b.text, b.metric, float(limit)))
    return out

