"""Turn `kdcompress distill` flags into a plan, so every scheme runs through the one runner.

Chains are plans: ``--chain resnet56,resnet32 --student resnet20`` is three offline stages
(teacher -> resnet56 -> resnet32 -> resnet20), or DGKD stages with ``--dgkd``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from compressor.cost import measure_arch
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from recipes.plan import TEACHER, Plan, Stage, raw_stages
from recipes.protocols import default_train

ONLINE_SCHEMES = ("cohort", "osakd")


@dataclass
class DistillRequest:
    data: str
    student: str
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: str | None = None
    teacher_arch: str | None = None
    teacher_flops: int | None = None
    scheme: str | None = None  # offline (default with a teacher) | modreduce | cohort | osakd | tcn | dgkd
    method: str | None = None
    chain: Sequence[str] = ()
    dgkd: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the dataset protocol


def distill_plan(req: DistillRequest) -> Plan:
    scheme = req.scheme or ("offline" if req.teacher else ("cohort" if req.options.get("cohort") else None))
    if scheme is None:
        raise UserError("without --teacher, choose an online scheme: --cohort N (or --scheme cohort) or --scheme osakd")
    if req.teacher is None and scheme not in ONLINE_SCHEMES:
        raise UserError(f"scheme {scheme!r} distils from a teacher: give --teacher T.pt")
    if req.teacher is not None and scheme in ONLINE_SCHEMES:
        raise UserError(f"scheme {scheme!r} trains without a teacher: drop --teacher")
    train = default_train(req.data, req.student, distill=req.teacher is not None, **req.train)
    if req.chain or req.dgkd or scheme == "dgkd":
        return _chain_plan(req, train)
    if scheme == "tcn":
        return _tcn_plan(req)
    if scheme == "modreduce":
        from compressor.schemes.modreduce import MODREDUCE_TRAIN_DEFAULTS, check_no_method

        check_no_method(req.method)
        overrides = {k: v for k, v in req.train.items() if v is not None}
        train = {**train, **MODREDUCE_TRAIN_DEFAULTS, **overrides}  # the command line still wins
    teachers = [TEACHER] if req.teacher else []
    stage = Stage("student", scheme, req.student, teachers, req.method, dict(req.options), train,
                  f"kdcompress distill --scheme {scheme}")
    recipe = "single" if scheme == "offline" else scheme
    return Plan(data=req.data, stages=[stage], teacher=req.teacher, teacher_arch=req.teacher_arch,
                recipe=recipe, seed=req.seed).validate()


def _chain_plan(req: DistillRequest, train: dict[str, Any]) -> Plan:
    chain = [c.strip() for c in req.chain]
    if not chain or any(not c for c in chain):
        raise UserError("--chain needs one or more teacher-assistant architectures, e.g. --chain resnet56,resnet32")
    check_chain_sizes(req.teacher_flops, chain, req.student, req.num_classes, req.input_shape)
    dgkd = req.dgkd or req.scheme == "dgkd"
    stages, above = [], [TEACHER]
    for i, arch in enumerate([*chain, req.student]):
        name = "student" if i == len(chain) else f"ta{i + 1}"
        teachers = list(above) if dgkd else [above[-1]]
        scheme = "dgkd" if dgkd and len(teachers) > 1 else "offline"
        stages.append(Stage(name, scheme, arch, teachers, req.method, dict(req.options),
                            default_train(req.data, arch, distill=True, **req.train), f"learns from {', '.join(teachers)}"))
        above.append(name)
    return Plan(data=req.data, stages=stages, teacher=req.teacher, teacher_arch=req.teacher_arch,
                recipe="dgkd" if dgkd else "takd", seed=req.seed).validate()


def _tcn_plan(req: DistillRequest) -> Plan:
    """Teacher-class network: one stage, or one per level when hierarchical (1 -> 2 -> 4 ... students).

    Trained with the authors' optimiser (Adam at a constant 2e-4) unless the command line says otherwise.
    """
    from compressor.schemes.tcn import TCN_TRAIN_DEFAULTS, tcn_levels

    options = {k: v for k, v in req.options.items() if k != "hierarchical"}
    levels = tcn_levels(int(options.get("students", 2)), bool(req.options.get("hierarchical")))
    train = {**default_train(req.data, req.student), **TCN_TRAIN_DEFAULTS, **req.train}
    stages = [
        Stage("student" if i == len(levels) - 1 else level.name, "tcn", req.student, [level.teacher], None,
              {**options, "students": level.students}, dict(train),
              f"{level.students} student(s) regress the embedding of {level.teacher}")
        for i, level in enumerate(levels)
    ]
    return Plan(data=req.data, stages=stages, teacher=req.teacher, teacher_arch=req.teacher_arch,
                recipe="tcn", seed=req.seed).validate()


def check_chain_sizes(teacher_flops: int | None, chain: Sequence[str], student: str, num_classes: int,
                      shape: tuple[int, int, int]) -> None:
    """Each link must be smaller than the one above it and larger than the student (by FLOPs)."""
    student_flops = measure_arch(student, num_classes, shape).flops
    previous_name, previous = "the teacher", teacher_flops
    for arch in chain:
        flops = measure_arch(arch, num_classes, shape).flops
        if previous is not None and flops >= previous:
            raise UserError(f"teacher assistant {arch} ({flops / 1e6:.2f} MFLOPs) is not smaller than "
                            f"{previous_name} ({previous / 1e6:.2f} MFLOPs)")
        if flops <= student_flops:
            raise UserError(f"teacher assistant {arch} ({flops / 1e6:.2f} MFLOPs) is not larger than the "
                            f"student {student} ({student_flops / 1e6:.2f} MFLOPs)")
        previous_name, previous = arch, flops


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset is a plan YAML (teacher and data may be left for the command line to fill)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {path} does not exist")
        text = path.read_text()
    else:
        bundled = resources.files("recipes") / "presets" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise UserError(f"unknown preset {name_or_path!r}; bundled: {', '.join(list_presets())}")
        text = bundled.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"preset {name_or_path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {name_or_path} is not a plan (a YAML mapping with 'stages')")
    return data


def list_presets() -> list[str]:
    folder = resources.files("recipes") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_plan(name_or_path: str, *, teacher: str | None, data: str | None, teacher_arch: str | None,
                method: str | None, seed: int | None, train: dict[str, Any],
                corruption: Corruption | None = None) -> Plan:
    """Fill a preset's blanks from the command line (which wins where both speak)."""
    raw = load_preset(name_or_path)
    raw = {**raw}
    if corruption is not None:
        raw["corruption"] = corruption.to_dict()
    if teacher is not None:
        raw["teacher"] = teacher
    if data is not None:
        raw["data"] = data
    if teacher_arch is not None:
        raw["teacher_arch"] = teacher_arch
    if seed is not None:
        raw["seed"] = seed
    stages = []
    for i, stage in enumerate(raw_stages(raw.get("stages"))):
        stage = dict(stage)
        if method is not None:
            stage["method"] = method
        own = stage.get("train") or {}
        if not isinstance(own, dict):
            raise UserError(f"plan stage {i + 1}: train must be a mapping of training settings, got {own!r:.60}")
        stage["train"] = {**own, **{k: v for k, v in train.items() if v is not None}}
        stages.append(stage)
    raw["stages"] = stages
    if not raw.get("data"):
        raise UserError(f"preset {name_or_path} names no data: give --data")
    return Plan.from_dict(raw)
