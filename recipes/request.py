"""What a user asks for, parsed once at the edge: the one request every entry point builds.

The main command, ``kdcompress plan``, ``--dry-run``, ``--preset`` and ``kdcompress distill`` (and
their Python calls) all turn their flags into a :class:`PlanRequest`: budgets become
:class:`~recipes.budget.Budget` s, the method a :class:`~compressor.knowledge.spec.MethodSpec`, the
data a :class:`~compressor.data.DataSpec`, and nothing downstream reads a user's string again.
The one planner (:mod:`recipes.planner`) turns it into a :class:`~recipes.plan.Plan`, the one
runner (:mod:`recipes.runner`) trains that. :class:`RunSettings` says how a run is kept and what is
delivered after it (the main command's output folder, export and report).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from compressor.errors import UserError
from compressor.typecheck import given
from recipes.budget import Budget, parse_budget

if TYPE_CHECKING:  # the CLI reads the names below when it is built: no torch at import time
    from compressor.data import DataSpec
    from compressor.data.corruptions import Corruption
    from compressor.knowledge.spec import MethodSpec
    from recipes.preset import Preset

RECIPES = ("single", "takd", "dgkd", "modreduce", "cohort", "osakd", "tcn")  # what --recipe may force
DISTILL_SCHEMES = ("offline", "dgkd", "modreduce", "cohort", "osakd", "tcn")  # what distill's --scheme lays out
CANDIDATE_SETS = ("zoo", "pruned", "all")  # the students searched: the zoo, the pruned teacher, both
DEFAULT_CANDIDATES = "all"  # the pruned teacher matched or beat the zoo in benchmarks/pruned_vs_zoo.py
DEFAULT_GAP_THRESHOLD = 8.0
DEFAULT_METHOD = "hinton+crd"  # the main command's (kdcompress distill trains with the scheme's: hinton)


@dataclass(frozen=True)
class TrainOverrides:
    """Training settings the command line sets for every stage (None: the stage's own)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None

    def given(self) -> dict[str, Any]:
        return given({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class PlanRequest:
    """Everything the planner needs from the user, typed."""

    teacher: str | None = None  # path of the teacher checkpoint (None: an online scheme, no teacher)
    teacher_arch: str | None = None  # for a teacher file that does not record its architecture
    trust: bool = False  # a teacher file holding pickled objects may be loaded
    data: DataSpec | None = None  # None: the teacher's recorded dataset (digits without a teacher)
    corruption: Corruption | None = None  # None: clean, or what a resumed run or a preset records
    seed: int = 0
    budgets: tuple[Budget, ...] = ()
    preset: Preset | None = None  # a bundled preset or a plan file (read once), run instead of planning
    recipe: str | None = None  # forced (RECIPES), else chosen by the gap rule (or named by the stages)
    student: str | None = None  # a named student: distill's, or the probe search's winner among the fitting
    chain: tuple[str, ...] | None = None  # named teacher assistants, largest first (distill --chain)
    method: MethodSpec | None = None  # the knowledge method of every stage that takes one
    default_method: MethodSpec | None = None  # the entry point's default for them (None: the scheme's)
    family: str | None = None  # search only this zoo family
    candidates: str = DEFAULT_CANDIDATES
    gap_threshold: float = DEFAULT_GAP_THRESHOLD
    latency_threads: int = 1  # onnxruntime threads for latency budgets (and the report's timing)
    options: Mapping[str, Any] = field(default_factory=dict)  # scheme options the command line gives
    train: TrainOverrides = TrainOverrides()

    @classmethod
    def from_user(cls, **values: Any) -> "PlanRequest":
        """Parse what a user typed (strings, lists, None for "not given") into a request; any
        mistake is one UserError. A value already typed is kept as it is."""
        from compressor.data import parse_spec
        from compressor.knowledge.spec import parse_method_spec

        unknown = sorted(set(values) - {f.name for f in fields(cls)} - set(TrainOverrides.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown request field(s): {', '.join(unknown)}")
        train = {k: values.pop(k) for k in list(values) if k in TrainOverrides.__dataclass_fields__}
        if isinstance(values.get("train"), Mapping):
            train = {**values.pop("train"), **given(train)}
        if train:
            values["train"] = TrainOverrides(**given(train))
        if values.get("budgets") is not None:
            values["budgets"] = tuple(b if isinstance(b, Budget) else parse_budget(b) for b in values["budgets"])
        for key in ("method", "default_method"):
            if isinstance(values.get(key), str):
                values[key] = parse_method_spec(values[key])
        if values.get("data") is not None:
            values["data"] = parse_spec(values["data"])
        if isinstance(values.get("preset"), str):
            from recipes.preset import load_preset

            preset = values["preset"] = load_preset(values["preset"])
            values["teacher"] = values.get("teacher") or preset.teacher  # a saved plan names its teacher
            values["corruption"] = values.get("corruption") or preset.corruption  # and its corruptions
        if values.get("chain") is not None and not isinstance(values["chain"], tuple):
            values["chain"] = tuple(values["chain"])
        values["candidates"] = parse_candidates(values.get("candidates"))
        recipe = values.get("recipe")
        if recipe is not None and recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        values["options"] = given(values.get("options") or {})
        return cls(**given(values))


def parse_candidates(text: str | None) -> str:
    value = (text or DEFAULT_CANDIDATES).strip().lower()
    if value not in CANDIDATE_SETS:
        raise UserError(f"--candidates must be one of {', '.join(CANDIDATE_SETS)} (got {text!r})")
    return value


@dataclass(frozen=True)
class RunSettings:
    """How the run is kept and what is delivered after its stages (the main command)."""

    out: Path | None = None  # the run folder (default runs/<teacher>-<budget>/)
    resume: bool = False
    force: bool = False
    device: str = "auto"
    int8: bool = False
    int8_margin: float | None = None  # top-1 points int8 may lose on validation (None: export's default)
    keep_int8_anyway: bool = False  # write an int8 file that missed the margin
    targets: tuple[str, ...] = ("onnx",)  # export targets (export/targets), each verified in its own runtime
    baseline: bool = False
    search: str = "rule"  # rule | probe
    probe_k: int = 4


def split_run(values: Mapping[str, Any]) -> tuple[dict[str, Any], RunSettings]:
    """User values (a Python call's keywords) -> the request's values and the run settings."""
    run_names = {f.name for f in fields(RunSettings)}
    run = given({k: v for k, v in values.items() if k in run_names})
    if run.get("out") is not None:
        run["out"] = Path(run["out"])
    if run.get("search") not in (None, "rule", "probe"):
        raise UserError(f"--search must be rule or probe (got {run['search']!r})")
    return {k: v for k, v in values.items() if k not in run_names}, RunSettings(**run)


def csv(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")`` (stripped); None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items)
