"""Resolve what a run starts from: the teacher, the data, and whether they fit each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from compressor.checkpoint import LoadedModel, load_model
from compressor.cost import Cost, measure
from compressor.data import DataSpec, parse_spec
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from compressor.trainer.evaluate import check_fits, class_names_warning

if TYPE_CHECKING:
    from recipes.request import PlanRequest


@dataclass
class RunInputs:
    """The teacher and the data a run starts from; what the planner plans for (its Subject)."""

    data: DataSpec
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: LoadedModel | None
    source: Any | None = None  # compressor.data.DataSource once loaded
    corruption: Corruption = field(default_factory=Corruption)  # what the training split was corrupted with
    notes: list[str] = field(default_factory=list)  # warnings for the user (one line each), not errors

    @property
    def data_spec(self) -> str:
        return self.data.text

    @property
    def teacher_arch(self) -> str | None:
        return self.teacher.meta.arch if self.teacher is not None else None

    @cached_property
    def teacher_cost(self) -> Cost | None:
        """The teacher's FLOPs and parameters (fvcore), measured when first asked: a plain
        distillation never asks, planning and the main command's report do."""
        return measure(self.teacher.model, self.input_shape) if self.teacher is not None else None

    def teacher_top1(self) -> float:
        """The teacher's test top-1 on the loaded data (the summary lines and the report)."""
        from compressor.trainer import evaluate

        batches = self.source.loader("test", 256, shuffle=False, augment=False)
        return evaluate(self.teacher.model, batches, self.source.num_classes).top1

    @property
    def teacher_flops(self) -> int | None:
        return self.teacher_cost.flops if self.teacher_cost is not None else None

    @property
    def teacher_params(self) -> int | None:
        return self.teacher_cost.params if self.teacher_cost is not None else None


def inputs_for(request: "PlanRequest", *, load_data: bool = True) -> RunInputs:
    """The inputs a request names (its teacher, its data or the teacher's, its corruptions)."""
    return resolve_inputs(request.teacher, request.data, arch=request.teacher_arch, trust=request.trust,
                          load_data=load_data, seed=request.seed, corruption=request.corruption)


def load_teacher(path: str | None, arch: str | None = None, trust: bool = False) -> LoadedModel | None:
    if path is None:
        return None
    return load_model(path, arch=arch, trust=trust)


def resolve_inputs(teacher_path: str | None, data: str | DataSpec | None, *, arch: str | None = None, trust: bool = False,
                   load_data: bool = True, val_fraction: float = 0.1, seed: int = 0,
                   corruption: Corruption | None = None) -> RunInputs:
    """Data defaults to what the teacher checkpoint records; a foreign teacher needs ``--data``.
    ``corruption`` (default: clean labels) corrupts the training split, seeded by ``seed``."""
    corruption = corruption or Corruption()
    teacher = load_teacher(teacher_path, arch, trust)
    text = data or (teacher.meta.dataset if teacher else None) or (None if teacher else "digits")
    if text is None:
        raise UserError(f"{teacher_path} does not record its dataset ({teacher.source_format} file): give --data")
    source = None
    # explicit data is always opened: it must be checked against the teacher
    opened = load_data or data is not None or teacher is None or teacher.meta.input_shape is None
    spec = parse_spec(text, check_dir=opened)  # a recorded dataset that is not opened need not be here
    if opened:
        from compressor.data import load_source

        source = load_source(spec, val_fraction=val_fraction, seed=seed, **corruption.to_dict())
        num_classes, shape = source.num_classes, tuple(source.input_shape)
    else:
        num_classes, shape = teacher.meta.num_classes, teacher.meta.input_shape
    notes: list[str] = []
    if teacher is not None:
        notes += check_teacher_fits(teacher, num_classes, shape, spec.text, source.class_names if source else None)
        notes += corruption_notes(teacher, corruption, seed)
    return RunInputs(spec, num_classes, tuple(shape), teacher, source, corruption, notes)


def same_corruption(recorded: Corruption, given: Corruption | None, what: str) -> Corruption:
    """A resumed run keeps its corruptions: flags that say otherwise are a mistake, not a change."""
    if given is not None and given != recorded:
        raise UserError(f"{what} trains on {recorded}, not {given}: drop --label-noise/--imbalance/--imbalance-gamma "
                        "to resume it, or start a new run")
    return recorded


def corruption_notes(teacher: LoadedModel, corruption: Corruption, seed: int) -> list[str]:
    """A note when the teacher was trained on other labels than this run's (the KD robustness
    benchmark trains both on the same corrupted labels: same corruption, same seed)."""
    data = teacher.extra.get("data") if isinstance(teacher.extra, dict) else None
    record = data.get("options") if isinstance(data, dict) else None
    try:
        theirs, their_seed = Corruption.from_dict(record), record.get("seed")
    except (UserError, AttributeError):
        return []  # a foreign teacher, or one that records nothing usable
    if theirs == corruption and (corruption.clean or their_seed == seed):
        return []
    return [f"note: the teacher was trained on {_labels(theirs, their_seed)} but this run uses "
            f"{_labels(corruption, seed)}: to train on the teacher's labels give its "
            "--label-noise/--imbalance/--imbalance-gamma and --seed"]


def _labels(corruption: Corruption, seed: Any) -> str:
    return "clean labels" if corruption.clean else f"{corruption} at seed {seed}"


def check_teacher_fits(teacher: LoadedModel, num_classes: int, shape: tuple[int, ...], spec: str,
                       class_names: list[str] | None = None) -> list[str]:
    """A UserError when the teacher cannot be used on the data; warnings (lines) when it can but
    its recorded class names differ from the data's."""
    meta = teacher.meta
    check_fits("the teacher", meta.num_classes, meta.input_shape, meta.in_chans, spec, num_classes, shape)
    warning = None if class_names is None else class_names_warning("the teacher", meta.class_names, spec, class_names)
    return [warning] if warning else []
