"""Schemes by name, so the CLI and the planner build any of them from one request.

Adding a scheme is one module with ``@register_scheme("name", options=TheOptions)`` on a builder
function, where ``TheOptions`` is a :class:`SchemeOptions` dataclass: the options a plan stage may
give the scheme, with their defaults and types, plus what the planner must know without building
it (whether it takes a teacher or a method, its own training settings). A stage's options are
checked against it when the plan is built: an unknown option is an error, never dropped.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

import torch.nn as nn

from compressor.errors import UserError
from compressor.knowledge.spec import MethodSpec, parse_method_spec
from compressor.schemes.base import Scheme
from compressor.typecheck import check_field_types

REQUIRED, REFUSED = "required", "refused"


@dataclass
class SchemeOptions:
    """A scheme's options (subclass as a dataclass; every field needs a default).

    Class attributes, read by the planner and the plan's checks:
      * ``teacher``: ``"required"`` or ``"refused"``;
      * ``takes_method`` and ``default_method``: whether a stage's method spec is used, and the one
        used when the stage gives none;
      * ``knowledge_terms``: the scheme trains knowledge-loss terms against a teacher (their
        gradient is clipped by our recipes, see recipes.protocols);
      * ``train_defaults``: training settings the scheme's paper uses, over the data's protocol.
    A subclass that accepts options beyond its fields (an aggregator's own hyper-parameters) says
    which in :meth:`extra_names` and finds them in :attr:`extra`.
    """

    teacher: ClassVar[str] = REQUIRED
    takes_method: ClassVar[bool] = False
    default_method: ClassVar[str | None] = None
    knowledge_terms: ClassVar[bool] = False
    train_defaults: ClassVar[Mapping[str, Any]] = {}

    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # accepted names beyond the fields

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def extra_names(cls, given: Mapping[str, Any]) -> list[str]:
        """Option names accepted beyond the fields, given the fields' values (default: none)."""
        return []

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], scheme: str, where: str = "") -> "SchemeOptions":
        """Check ``data`` (a plan stage's options, the command line's) and build the options."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where or scheme}: options must be a mapping, got {data!r:.60}")
        known = cls.field_names()
        given = {k: v for k, v in data.items() if k in known}
        check_field_types(cls, given, f"{where or scheme} option")
        rest = {k: v for k, v in data.items() if k not in known}
        if rest:
            allowed = cls.extra_names(given)
            unknown = sorted(k for k in rest if k not in allowed)
            if unknown:
                raise UserError(f"{where + ': ' if where else ''}the {scheme} scheme takes no option "
                                f"{', '.join(map(repr, unknown))}; it takes {', '.join(known + allowed) or 'none'}")
        options = cls(**given, extra=dict(rest))
        options.check()
        return options

    def check(self) -> None:
        """Values the types let through but the scheme cannot take: a UserError (override)."""

    @classmethod
    def refuse_method(cls, scheme: str, method: MethodSpec) -> None:
        """A method given to a scheme that takes none would be recorded and ignored: refused."""
        raise UserError(f"the {scheme} scheme takes no --method (got {method.text!r}): its objective is fixed; "
                        "drop the method")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**data, **self.extra}


@dataclass
class NoOptions(SchemeOptions):
    """A scheme with no options that learns from a teacher."""


@dataclass
class SchemeRequest:
    """Everything a builder may need; builders ignore what they do not use."""

    student_arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    num_train: int  # training-split size (CRD and OSAKD size their memories from it)
    teacher: nn.Module | None = None  # frozen, already loaded
    method: MethodSpec | str | None = None  # knowledge method spec (a text is parsed by build_scheme)
    # the scheme's options (a mapping is checked and typed by build_scheme against the scheme's class)
    options: SchemeOptions | Mapping[str, Any] = field(default_factory=dict)
    teachers: list[nn.Module] = field(default_factory=list)  # every frozen teacher, largest first (DGKD)
    batch_size: int | None = None  # the batch each process trains on (SemCKD's batch-similarity size)
    label_smoothing: float = 0.0  # the trainer's setting, applied by schemes that own a hard-label CE
    student_init: nn.Module | None = None  # a built student to start from (the pruned teacher)


SchemeBuilder = Callable[[SchemeRequest], Scheme]


@dataclass(frozen=True)
class SchemeEntry:
    name: str
    builder: SchemeBuilder
    options: type[SchemeOptions]


_SCHEMES: dict[str, SchemeEntry] = {}


def register_scheme(name: str, options: type[SchemeOptions] = NoOptions) -> Callable[[SchemeBuilder], SchemeBuilder]:
    def decorator(builder: SchemeBuilder) -> SchemeBuilder:
        if name in _SCHEMES:
            raise ValueError(f"scheme {name!r} registered twice")
        _SCHEMES[name] = SchemeEntry(name, builder, options)
        return builder

    return decorator


def scheme_entry(name: str) -> SchemeEntry:
    _ensure_loaded()
    if name not in _SCHEMES:
        close = difflib.get_close_matches(name, list(_SCHEMES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown scheme {name!r}{hint}; known: {', '.join(list_schemes())}")
    return _SCHEMES[name]


def scheme_options(name: str) -> type[SchemeOptions]:
    """The options class of scheme ``name`` (what the planner asks before building anything)."""
    return scheme_entry(name).options


def build_scheme(name: str, request: SchemeRequest) -> Scheme:
    entry = scheme_entry(name)
    method = parse_method_spec(request.method) if isinstance(request.method, str) else request.method
    if method is not None and not entry.options.takes_method:
        entry.options.refuse_method(name, method)
    options = request.options
    if not isinstance(options, SchemeOptions):
        options = entry.options.from_dict(options, name)
    elif not isinstance(options, entry.options):
        raise TypeError(f"scheme {name!r} takes {entry.options.__name__}, not {type(options).__name__}")
    request = SchemeRequest(**{**vars(request), "options": options, "method": method})
    return entry.builder(request)


def list_schemes() -> list[str]:
    _ensure_loaded()
    return sorted(_SCHEMES)


def _ensure_loaded() -> None:
    import compressor.schemes  # noqa: F401
