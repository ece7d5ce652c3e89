"""What a main-command run produced, typed: the content of report.json, report.md and the plots.

:func:`recipes.compress.compress` fills a :class:`Report` step by step; :mod:`recipes.report`
renders it (markdown, plots, the summary table) and writes :meth:`Report.to_dict` as report.json,
whose keys are these fields' names. The deployment figures (the ONNX file, its parity, int8 and
latency) are kept as the deployment step records them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageFigures:
    """One trained stage: where its model is, its final metrics and its per-epoch records."""

    name: str
    arch: str
    scheme: str
    teachers: list[str]
    checkpoint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ModelFigures:
    """A column of the summary table: one model's accuracy, size and speed."""

    arch: str
    flops: int | None = None
    params: int | None = None
    test_top1: float | None = None
    latency: dict[str, Any] | None = None  # recipes.deploy.latency_of: torch_ms, onnx_ms (int8_ms), details

    def latency_ms(self, key: str) -> float | None:
        return (self.latency or {}).get(key)


@dataclass
class TeacherFigures(ModelFigures):
    path: str | None = None


@dataclass
class PruningSummary:
    """A pruned teacher as the student: how it was pruned, what recovery training gave back."""

    tool: str | None = None
    tool_version: str | None = None
    ratio: float | None = None
    importance: str | None = None
    scope: str | None = None
    round_to: int | None = None
    val_top1_before_recovery: float | None = None
    val_top1_after_recovery: float | None = None
    torch_speedup_vs_teacher: float | None = None


@dataclass
class StudentFigures(ModelFigures):
    search_name: str = ""  # the candidate the search chose (a pruned teacher is ``<arch>-pruned``)
    checkpoint: str = ""
    val_top1: float | None = None
    onnx: dict[str, Any] | None = None  # the deployment step's summary of the ONNX file and its parity
    int8: dict[str, Any] | None = None  # and of the int8 copy, when asked for
    targets: dict[str, Any] | None = None  # every export target's file, its parity and runtime (export/targets)
    pruning: PruningSummary | None = None


@dataclass
class BaselineFigures:
    """The same student trained on labels alone (``--baseline``), and the KD gain over it."""

    arch: str
    test_top1: float | None = None
    val_top1: float | None = None
    kd_gain: float | None = None
    checkpoint: str | None = None


@dataclass
class Report:
    student: StudentFigures
    teacher: TeacherFigures | None = None
    kdcompress_version: str = ""
    flop_convention: str = ""
    data: str = ""
    budgets: list[str] = field(default_factory=list)
    recipe: str = ""
    reasons: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    probe: list[dict[str, Any]] | None = None
    budget_lines: dict[str, list[float]] = field(default_factory=dict)  # "mflops"/"mparams" -> ceilings
    stages: list[StageFigures] = field(default_factory=list)
    baseline: BaselineFigures | None = None
    files: dict[str, str] = field(default_factory=dict)  # kind -> path ("plot:<name>" for plots)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """report.json: plain values, these fields' names as keys (a pruned student's ``pruning``
        appears only when there is one)."""
        data = asdict(self)
        if self.student.pruning is None:
            data["student"].pop("pruning")
        return data
