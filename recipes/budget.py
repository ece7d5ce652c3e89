"""Budgets a user can give: FLOPs, parameters, batch-1 latency, or a compression factor.

Accepted forms (case-insensitive, spaces optional, ``--budget`` repeatable; all must hold):
  * FLOPs:      ``0.1GFLOPs``, ``100MFLOPs``, ``100M FLOPs``, ``2e6 flops``  (1 multiply-add = 1 FLOP)
  * parameters: ``1.5Mparams``, ``300K params``, ``250000 params``
  * latency:    ``5ms``, ``800us``, ``0.005s``  (batch 1, onnxruntime, on this machine)
  * factor:     ``10x`` (at most 1/10 of the teacher's FLOPs)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from compressor.errors import UserError

ACCEPTED = "e.g. 0.1GFLOPs, 100M FLOPs, 1.5Mparams, 300K params, 5ms, 10x"
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"
_PATTERNS = {
    "flops": re.compile(rf"{_NUMBER}(?P<scale>[kmgt]?)flops?"),
    "params": re.compile(rf"{_NUMBER}(?P<scale>[kmgt]?)params?"),
    "latency": re.compile(rf"{_NUMBER}(?P<unit>ms|us|µs|s)"),
    "factor": re.compile(rf"{_NUMBER}x"),
}
_LATENCY_UNIT = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops" | "params" | "latency" | "factor"
    value: float  # FLOPs, parameters, milliseconds, or the factor
    text: str  # what the user wrote

    def describe(self) -> str:
        if self.kind == "flops":
            return f"<= {self.value / 1e6:g} MFLOPs"
        if self.kind == "params":
            return f"<= {self.value / 1e6:g} M params"
        if self.kind == "latency":
            return f"<= {self.value:g} ms at batch 1"
        return f">= {self.value:g}x fewer FLOPs than the teacher"

    def flops_limit(self, teacher_flops: int | None) -> float | None:
        """The FLOPs ceiling this budget implies (None if it says nothing about FLOPs)."""
        if self.kind == "flops":
            return self.value
        if self.kind == "factor":
            if teacher_flops is None:
                raise UserError(f"budget {self.text!r} is relative to the teacher: give --teacher")
            return teacher_flops / self.value
        return None


def parse_budget(text: str) -> Budget:
    """One budget string -> Budget; anything else is a UserError listing the accepted forms."""
    compact = text.strip().lower().replace(" ", "").replace("_", "")
    for kind, pattern in _PATTERNS.items():
        match = pattern.fullmatch(compact)
        if not match:
            continue
        number = float(match["num"])
        if kind in ("flops", "params"):
            value = number * _SCALE[match["scale"]]
        elif kind == "latency":
            value = number * _LATENCY_UNIT[match["unit"]]
        else:
            value = number
        if value <= 0 or (kind == "factor" and value <= 1):
            need = "a factor above 1" if kind == "factor" else "a positive amount"
            raise UserError(f"budget {text!r} must be {need} ({ACCEPTED})")
        return Budget(kind, value, text.strip())
    raise UserError(f"cannot read budget {text!r}; accepted forms: {ACCEPTED}")


def parse_budgets(texts: Sequence[str]) -> list[Budget]:
    if not texts:
        raise UserError(f"give at least one --budget ({ACCEPTED})")
    return [parse_budget(t) for t in texts]
