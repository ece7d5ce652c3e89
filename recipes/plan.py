"""The plan: a plain, serialisable description of everything that will be trained.

The planner writes one from (teacher, budget, data) with a reason for every choice; a user can
write one by hand in YAML (``--preset FILE.yaml``). Running a plan is the only way anything trains.
A stage trains one model (or one cohort) with a registered scheme; its teachers are ``teacher``
(the user's model) or the names of earlier stages, which is how TA chains are expressed.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from compressor.atomic import write_text
from compressor.data.corruptions import Corruption
from compressor.trainer.config import TrainConfig

from compressor.errors import UserError
from compressor.typecheck import check_field_types

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
class Stage:
    name: str  # unique within the plan, e.g. "ta1", "student"
    scheme: str  # a registered scheme: offline, dgkd, cohort, modreduce, osakd, tcn, vanilla
    arch: str  # the architecture this stage trains
    teachers: list[str] = field(default_factory=list)  # "teacher" and/or earlier stage names
    method: str | None = None  # knowledge method spec, e.g. "hinton+crd"
    options: dict[str, Any] = field(default_factory=dict)  # scheme options (cohort size, drop rate...)
    train: dict[str, Any] = field(default_factory=dict)  # trainer settings (epochs, lr, batch_size...)
    reason: str = ""


@dataclass
class Plan:
    data: str
    stages: list[Stage]
    teacher: str | None = None  # path of the teacher checkpoint
    teacher_arch: str | None = None
    budgets: list[str] = field(default_factory=list)
    recipe: str = "single"  # single | takd | dgkd | modreduce | cohort | osakd | tcn | pruned (recipes.pruned)
    seed: int = 0
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the search table, for the report
    # training-set corruptions every stage trains with (label_noise, imbalance, imbalance_gamma; {} = clean)
    corruption: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def data_corruption(self) -> Corruption:
        return Corruption.from_dict(self.corruption)

    def validate(self) -> "Plan":
        """A hand-written plan gets the same checks as a planned one, with one-line errors."""
        if not self.stages:
            raise UserError("the plan has no stages")
        Corruption.from_dict(self.corruption)  # a bad record fails here, before any data is read
        seen: set[str] = set()
        for stage in self.stages:
            if not STAGE_NAME.fullmatch(stage.name):  # it names the folder stages/<name>/ of the run
                raise UserError(f"stage name {stage.name!r} must be a plain folder name (letters, digits, '_', '-', "
                                "'.'; not starting with '.'), not a path")
            if stage.name in seen or stage.name == TEACHER:
                raise UserError(f"stage name {stage.name!r} is used twice (or is the reserved name 'teacher')")
            if stage.method:
                from compressor.knowledge.spec import parse_method_spec

                spec = parse_method_spec(stage.method)  # a bad method fails here, before anything runs
                if all(weight == 0 for _, weight in spec.as_list()):
                    raise UserError(f"the method {stage.method!r} of stage {stage.name!r} gives every weight 0: "
                                    "the loss would be 0 and nothing would train; give one term a weight > 0")
            if stage.options.get("prune") and stage.scheme != "offline":
                raise UserError(f"stage {stage.name!r} trains a pruned teacher, which only the offline scheme does "
                                f"(not {stage.scheme!r})")
            TrainConfig.from_dict({k: v for k, v in stage.train.items() if v is not None})  # a bad setting (e.g. a learning rate of inf) fails here too
            for t in stage.teachers:
                if t != TEACHER and t not in seen:
                    raise UserError(f"stage {stage.name!r} learns from {t!r}, which is not an earlier stage")
                if t == TEACHER and self.teacher is None:
                    raise UserError(f"stage {stage.name!r} learns from the teacher, but the plan names none")
            seen.add(stage.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or "stages" not in data or "data" not in data:
            raise UserError("a plan needs at least 'data' and 'stages' (see `kdcompress plan --help`)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown plan field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        check_field_types(cls, {k: v for k, v in data.items() if k != "stages"}, "plan")
        stage_fields = {f.name for f in fields(Stage)}
        stages = []
        for i, raw in enumerate(raw_stages(data["stages"])):
            if not {"name", "scheme", "arch"} <= set(raw):
                raise UserError(f"plan stage {i + 1} needs 'name', 'scheme' and 'arch'")
            bad = sorted(set(raw) - stage_fields)
            if bad:
                raise UserError(f"plan stage {raw['name']!r} has unknown field(s) {', '.join(bad)}")
            check_field_types(Stage, raw, f"plan stage {i + 1}")
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
