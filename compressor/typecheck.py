"""Check a hand-written mapping (plan, preset, training settings) against a dataclass's field types
before the dataclass is built.

YAML gives whatever the user typed: ``epochs: many``, ``teachers: teacher`` (a string where a list
belongs), ``train: [1]``. Built as they are, these fail far from the file, as a TypeError inside
training or, worse, run with a meaning nobody wrote (a string iterated as a list of letters). Here
each value is compared with its field's annotation once, at the edge, and a mismatch is one line
naming the field and what it must be. A list is accepted where a tuple is annotated (YAML has no
tuples); an int where a float is; a bool never counts as a number.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Mapping

from compressor.errors import UserError


def check_field_types(cls: type, data: Mapping[str, Any], where: str) -> None:
    """UserError naming the first field of ``data`` whose value does not fit ``cls``'s annotation;
    keys that are not fields are left to the caller (which names them as unknown)."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and not fits(value, hints[name]):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{where}: {name} must be {describe(hints[name])}, got {shown}")


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as YAML or JSON gives it) is of the annotated type."""
    if annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(fits(k, args[0]) and fits(v, args[1])
                                                             for k, v in value.items()))
    return isinstance(value, origin or annotation)


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values that say something: None means "not given, keep the default" (a flag left out,
    a ``null`` in a plan)."""
    return {k: v for k, v in values.items() if v is not None}


_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}


def describe(annotation: Any) -> str:
    """How the type reads in an error message: 'a whole number', 'a list of text', 'text or null'."""
    if annotation is Any:
        return "anything"
    if annotation in _NAMES:
        return _NAMES[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list ({describe(args[0])} each)" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))
