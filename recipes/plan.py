"""The plan: a plain, serialisable description of everything that will be trained.

The planner writes one from (teacher, budget, data) with a reason for every choice; a user can
write one by hand in YAML (``--preset FILE.yaml``). Running a plan is the only way anything trains.
A stage trains one model (or one cohort) with a registered scheme; its teachers are ``teacher``
(the user's model) or the names of earlier stages, which is how TA chains are expressed.

In memory a plan holds typed values: each stage's ``train`` is a :class:`TrainConfig`, its
``method`` a :class:`MethodSpec`, the budgets are :class:`Budget` s; its ``options`` are checked
against the scheme's options class when the plan is built, so a setting is either used or refused.
The recipe (single, takd, dgkd, ...) is not chosen separately: it is read off the stages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from compressor.atomic import write_text
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from compressor.knowledge.spec import MethodSpec, parse_method_spec
from compressor.trainer.config import TrainConfig
from compressor.typecheck import check_field_types, given
from recipes.budget import Budget, parse_budget

PLAN_VERSION = 1
TEACHER = "teacher"
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def raw_stages(stages: Any) -> list[dict[str, Any]]:
    """A hand-written plan's ``stages``: a list of mappings, or one line saying it is not."""
    if stages is None:
        return []
    if not isinstance(stages, list):
        raise UserError(f"the plan's stages must be a list of mappings, got {type(stages).__name__}")
    for i, raw in enumerate(stages):
        if not isinstance(raw, dict):
            raise UserError(f"plan stage {i + 1} must be a mapping with 'name', 'scheme' and 'arch', "
                            f"got {type(raw).__name__}")
    return stages


@dataclass
class _StageFile:
    """A stage as YAML writes it (what a hand-written stage is checked against)."""

    name: str
    scheme: str
    arch: str
    teachers: list[str] = field(default_factory=list)
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class _PlanFile:
    """A plan as YAML writes it."""

    data: str
    stages: list[Any]
    teacher: str | None = None
    teacher_arch: str | None = None
    budgets: list[str] = field(default_factory=list)
    recipe: str | None = None
    seed: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    corruption: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION


@dataclass
class Stage:
    name: str  # unique within the plan, e.g. "ta1", "student"
    scheme: str  # a registered scheme: offline, dgkd, cohort, modreduce, osakd, tcn, vanilla
    arch: str  # the architecture this stage trains
    teachers: list[str] = field(default_factory=list)  # "teacher" and/or earlier stage names
    method: MethodSpec | None = None  # knowledge method spec, e.g. "hinton+crd" (a text is parsed)
    options: dict[str, Any] = field(default_factory=dict)  # the scheme's options (its SchemeOptions)
    # trainer settings; a mapping (a hand-written stage) becomes a TrainConfig in its plan, seeded by the plan
    train: TrainConfig | Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = parse_method_spec(self.method)
        self.teachers = list(self.teachers)
        self.options = dict(self.options)

    @property
    def config(self) -> TrainConfig:
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"stage {self.name!r} is not part of a plan yet")
        return self.train

    def to_dict(self) -> dict[str, Any]:
        train = self.train.to_dict() if isinstance(self.train, TrainConfig) else dict(self.train)
        train.pop("extra", None)  # the trainer's own (an init phase's name), never a plan's
        return {"name": self.name, "scheme": self.scheme, "arch": self.arch, "teachers": list(self.teachers),
                "method": self.method.text if self.method else None, "options": dict(self.options),
                "train": train, "reason": self.reason}


def recipe_of(stages: list[Stage]) -> str:
    """What the stages make: ``single`` (one offline stage), ``takd`` (a chain of them), ``dgkd`` (a
    chain with DGKD stages), ``pruned`` (the pruned teacher's recovery), else the last scheme's name
    (``cohort``, ``osakd``, ``modreduce``, ``tcn``, ``vanilla``)."""
    schemes = [s.scheme for s in stages]
    if any(s.options.get("prune") for s in stages):
        return "pruned"
    if "dgkd" in schemes:
        return "dgkd"
    if schemes and all(s == "offline" for s in schemes):
        return "single" if len(schemes) == 1 else "takd"
    return schemes[-1] if schemes else "single"


@dataclass
class Plan:
    data: str
    stages: list[Stage]
    teacher: str | None = None  # path of the teacher checkpoint
    teacher_arch: str | None = None
    budgets: list[Budget] = field(default_factory=list)  # (a text is parsed)
    # read off the stages (recipe_of): single | takd | dgkd | pruned | modreduce | cohort | osakd | tcn | vanilla;
    # a value given (a plan file's) must agree with them
    recipe: str | None = None
    seed: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the search table, for the report
    # training-set corruptions every stage trains with (label_noise, imbalance, imbalance_gamma; {} = clean)
    corruption: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.budgets = [parse_budget(b) if isinstance(b, str) else b for b in self.budgets]
        for i, stage in enumerate(self.stages):
            if not isinstance(stage.train, TrainConfig):
                if not isinstance(stage.train, Mapping):
                    raise UserError(f"plan stage {i + 1}: train must be a mapping of training settings, "
                                    f"got {stage.train!r:.60}")
                # a stage trains with the plan's seed unless it names its own
                stage.train = TrainConfig.from_dict({"seed": self.seed, **given(stage.train)})
        if self.recipe is None:
            self.recipe = recipe_of(self.stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def data_corruption(self) -> Corruption:
        return Corruption.from_dict(self.corruption)

    @property
    def budget_texts(self) -> list[str]:
        return [b.text for b in self.budgets]

    def validate(self) -> "Plan":
        """A hand-written plan gets the same checks as a planned one, with one-line errors."""
        from compressor.schemes.registry import REFUSED, REQUIRED, scheme_options

        if not self.stages:
            raise UserError("the plan has no stages")
        if self.version != PLAN_VERSION:
            raise UserError(f"plan version {self.version} is not one this kdcompress reads ({PLAN_VERSION})")
        Corruption.from_dict(self.corruption)  # a bad record fails here, before any data is read
        derived = recipe_of(self.stages)
        if self.recipe != derived:
            raise UserError(f"the plan says recipe {self.recipe!r} but its stages make {derived!r} "
                            "(the recipe is read off the stages): drop 'recipe' or fix the stages")
        seen: set[str] = set()
        for stage in self.stages:
            if not STAGE_NAME.fullmatch(stage.name):  # it names the folder stages/<name>/ of the run
                raise UserError(f"stage name {stage.name!r} must be a plain folder name (letters, digits, '_', '-', "
                                "'.'; not starting with '.'), not a path")
            if stage.name in seen or stage.name == TEACHER:
                raise UserError(f"stage name {stage.name!r} is used twice (or is the reserved name 'teacher')")
            where = f"stage {stage.name!r}"
            options = scheme_options(stage.scheme)  # an unknown scheme fails here, before anything runs
            if stage.method is not None:
                if all(weight == 0 for _, weight in stage.method.as_list()):
                    raise UserError(f"the method {stage.method.text!r} of {where} gives every weight 0: "
                                    "the loss would be 0 and nothing would train; give one term a weight > 0")
                if not options.takes_method:
                    options.refuse_method(stage.scheme, stage.method)
            options.from_dict(stage.options, stage.scheme, where)  # an unknown option is refused, not dropped
            if stage.config.extra:
                raise UserError(f"{where}: train.extra is the trainer's own record, not a setting")
            if options.teacher == REQUIRED and not stage.teachers:
                raise UserError(f"{where} trains with the {stage.scheme} scheme, which learns from a teacher: "
                                "give it teachers")
            if options.teacher == REFUSED and stage.teachers:
                raise UserError(f"{where} trains with the {stage.scheme} scheme, which learns from no teacher: "
                                "drop its teachers")
            for t in stage.teachers:
                if t != TEACHER and t not in seen:
                    raise UserError(f"{where} learns from {t!r}, which is not an earlier stage")
                if t == TEACHER and self.teacher is None:
                    raise UserError(f"{where} learns from the teacher, but the plan names none")
            seen.add(stage.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "stages": [s.to_dict() for s in self.stages], "teacher": self.teacher,
                "teacher_arch": self.teacher_arch, "budgets": self.budget_texts, "recipe": self.recipe,
                "seed": self.seed, "reasons": list(self.reasons), "candidates": list(self.candidates),
                "corruption": dict(self.corruption), "version": self.version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or "stages" not in data or "data" not in data:
            raise UserError("a plan needs at least 'data' and 'stages' (see `kdcompress plan --help`)")
        known = {f.name for f in fields(_PlanFile)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown plan field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        check_field_types(_PlanFile, {k: v for k, v in data.items() if k != "stages"}, "plan")
        stage_fields = {f.name for f in fields(_StageFile)}
        stages = []
        for i, raw in enumerate(raw_stages(data["stages"])):
            if not {"name", "scheme", "arch"} <= set(raw):
                raise UserError(f"plan stage {i + 1} needs 'name', 'scheme' and 'arch'")
            bad = sorted(set(raw) - stage_fields)
            if bad:
                raise UserError(f"plan stage {raw['name']!r} has unknown field(s) {', '.join(bad)}")
            check_field_types(_StageFile, raw, f"plan stage {i + 1}")
            stages.append(Stage(**raw))
        return cls(**{**data, "stages": stages}).validate()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"the plan is not valid YAML ({str(err).splitlines()[0]})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"plan file {path} does not exist")
        return cls.from_yaml(path.read_text())

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_yaml())

