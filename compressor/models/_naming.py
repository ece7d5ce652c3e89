"""Shared helpers for systematic, scalable model names (``..._w0.5`` and the like).

Not a family module (the leading underscore keeps the package from importing it as one).
"""

from __future__ import annotations

from compressor.errors import UserError

WIDTH_RE = r"(\d+(?:\.\d+)?)"  # a width multiplier in a name: 1, 4, 0.5, 1.25


def fmt_width(width: float) -> str:
    """The canonical spelling of a width multiplier in a name: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{float(width):g}"


def scale_channels(channels: int, width: float) -> int:
    """Channels times a width multiplier, rounded half up to an int, never below 1."""
    return max(1, int(channels * float(width) + 0.5))


def parse_width(text: str, name: str) -> float:
    width = float(text)
    if width <= 0:
        raise UserError(f"model {name!r}: the width multiplier must be positive, got {text}")
    return width


def check_depth(name: str, depth: int, *, step: int, offset: int, minimum: int) -> int:
    """Raise a UserError unless ``depth`` is ``step * n + offset`` with ``depth >= minimum``."""
    if depth < minimum or (depth - offset) % step:
        examples = ", ".join(str(minimum + step * i) for i in range(4))
        raise UserError(
            f"model {name!r}: depth {depth} is not {step}n+{offset} (use e.g. {examples}, ...)"
        )
    return depth
