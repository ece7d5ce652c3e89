"""Resolve what a run starts from: the teacher, the data, and whether they fit each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.checkpoint import LoadedModel, load_model
from compressor.cost import Cost, measure
from compressor.errors import UserError


@dataclass
class RunInputs:
    data_spec: str
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: LoadedModel | None
    teacher_cost: Cost | None
    source: Any | None = None  # compressor.data.DataSource once loaded


def load_teacher(path: str | None, arch: str | None = None, trust: bool = False) -> LoadedModel | None:
    if path is None:
        return None
    return load_model(path, arch=arch, trust=trust)


def resolve_inputs(teacher_path: str | None, data: str | None, *, arch: str | None = None, trust: bool = False,
                   load_data: bool = True, val_fraction: float = 0.1, seed: int = 0) -> RunInputs:
    """Data defaults to what the teacher checkpoint records; a foreign teacher needs ``--data``."""
    teacher = load_teacher(teacher_path, arch, trust)
    spec = data or (teacher.meta.dataset if teacher else None) or (None if teacher else "digits")
    if spec is None:
        raise UserError(f"{teacher_path} does not record its dataset ({teacher.source_format} file): give --data")
    source = None
    # explicit data is always opened: it must be checked against the teacher
    if load_data or data is not None or teacher is None or teacher.meta.input_shape is None:
        from compressor.data import load_source

        source = load_source(spec, val_fraction=val_fraction, seed=seed)
        num_classes, shape = source.num_classes, tuple(source.input_shape)
    else:
        num_classes, shape = teacher.meta.num_classes, teacher.meta.input_shape
    cost = None
    if teacher is not None:
        check_teacher_fits(teacher, num_classes, shape, spec)
        cost = measure(teacher.model, shape)
    return RunInputs(spec, num_classes, shape, teacher, cost, source)


def check_teacher_fits(teacher: LoadedModel, num_classes: int, shape: tuple[int, ...], spec: str) -> None:
    meta = teacher.meta
    if meta.num_classes != num_classes:
        raise UserError(f"the teacher predicts {meta.num_classes} classes but {spec} has {num_classes}")
    if meta.in_chans != shape[0]:
        raise UserError(f"the teacher takes {meta.in_chans}-channel images but {spec} has {shape[0]} channels")
    if meta.input_shape is not None and tuple(meta.input_shape) != tuple(shape):
        raise UserError(
            f"the teacher was trained at {'x'.join(map(str, meta.input_shape))} but {spec} is "
            f"{'x'.join(map(str, shape))}"
        )
