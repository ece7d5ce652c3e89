"""The one planner: a request and what it is for -> a Plan, with a reason for every choice.

Every entry point plans here: the main command and ``kdcompress plan`` (a student searched for the
budget), ``kdcompress distill`` (a named student, perhaps a named chain), and a preset (a plan
written ahead, filled from the command line).

Recipe rule: capacity gap = teacher FLOPs / student FLOPs. Above ``gap_threshold`` (default 8)
teacher assistants are inserted at roughly geometric steps of FLOPs between teacher and student
(Mirzadeh et al. 2020, TAKD), as many as it takes for each step to be within the threshold; with
two or more TAs every stage learns from all the models above it (Son et al. 2021, DGKD). Without
a teacher the recipe is an online cohort with the attention aggregator (or OSAKD on request). A
named student (distill) is distilled once, or through the chain named with it; no gap rule.

Method: a stage whose scheme takes one trains with the request's method, else the entry point's
default (the main command's ``hinton+crd``, :data:`DEFAULT_METHOD`), else the scheme's own
(``hinton``, what ``kdcompress distill`` uses); a method given to a scheme that takes none is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from compressor.errors import UserError
from recipes.plan import TEACHER, Plan, Stage, raw_stages
from recipes.preset import Preset
from recipes.protocols import default_train
from recipes.request import DEFAULT_METHOD, PlanRequest  # noqa: F401  (DEFAULT_METHOD: documented here)
from recipes.search import (
    Candidate,
    LatencyFn,
    apply_budgets,
    check_budget_range,
    display_name,
    measure_candidates,
    pick,
    teacher_family_of,
)

if TYPE_CHECKING:
    from compressor.data import DataSpec
    from compressor.knowledge.spec import MethodSpec

TEACHER_RECIPES = ("single", "takd", "dgkd", "modreduce", "tcn")
ONLINE_RECIPES = ("cohort", "osakd")
DEFAULT_COHORT = {"cohort": 3, "aggregator": "attention"}  # the planner's cohort without a teacher


class Subject(Protocol):
    """What a plan is for: the data (spec, classes, shape) and the teacher's architecture and size
    (:class:`recipes.context.RunInputs` measures the size only when asked)."""

    data: "str | DataSpec"
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher_arch: str | None
    teacher_flops: int | None
    teacher_params: int | None


@dataclass
class Facts:
    """A :class:`Subject` given as numbers (tests, benchmarks, a caller that measured already)."""

    data: "str | DataSpec"
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher_arch: str | None = None
    teacher_flops: int | None = None
    teacher_params: int | None = None


@dataclass(frozen=True)
class PrunedOffer:
    """The teacher pruned to the budget as a candidate (recipes.pruned), or None and why not."""

    candidate: Candidate | None
    reason: str


def make_plan(request: PlanRequest, subject: Subject, *, latency: LatencyFn | None = None,
              pruned: PrunedOffer | None = None) -> Plan:
    """The plan for ``request``; ``latency`` times a zoo model for a latency budget, ``pruned`` is the
    pruned-teacher candidate when ``--candidates`` asks for it."""
    if request.preset is not None:
        return preset_plan(request.preset, request, str(subject.data) if subject.data else None)
    _check_recipe(request)
    reasons: list[str] = []
    if request.student is not None and not request.budgets:
        student, candidates = _named(request.student), []
    else:
        student, candidates = _search(request, subject, latency, pruned, reasons)
    stages = _stages(request, subject, student, candidates, reasons)
    _check_options_used(request, stages)
    clip = stages[-1].train.grad_clip if request.teacher is not None else None
    if clip and candidates:
        reasons.append(f"distillation stages clip the gradient norm at {clip:g}: the KD gradient grows with the "
                       "teacher-student logit gap and can kill a student without BatchNorm (recipes/protocols.py)")
    corruption = request.corruption
    if corruption is not None and not corruption.clean:
        reasons.append(f"every stage trains on corrupted labels: {corruption} at seed {request.seed} "
                       "(val and test stay clean)")
    return Plan(
        data=str(subject.data), stages=stages, teacher=request.teacher, teacher_arch=subject.teacher_arch,
        budgets=list(request.budgets), seed=request.seed, reasons=reasons,
        candidates=[c.to_dict() for c in sorted(candidates, key=lambda c: c.flops)],
        corruption=(corruption or _clean()).to_dict(),
    ).validate()


def _clean():
    from compressor.data.corruptions import Corruption

    return Corruption()


def _check_recipe(request: PlanRequest) -> None:
    recipe = request.recipe
    if request.teacher is None and recipe in TEACHER_RECIPES:
        raise UserError(f"recipe {recipe!r} distils from a teacher: give --teacher")
    if request.teacher is not None and recipe in ONLINE_RECIPES:
        raise UserError(f"recipe {recipe!r} trains without a teacher: drop --teacher")
    if recipe == "modreduce" and request.method is not None:
        from compressor.schemes.modreduce import check_no_method

        check_no_method(request.method.text)


def _check_options_used(request: PlanRequest, stages: list[Stage]) -> None:
    """Each command-line option goes to the stages whose scheme takes it (DGKD's drop rate to the DGKD
    stages of a chain, not to its first, offline, one); one that no stage takes is refused, not dropped."""
    from compressor.schemes.registry import scheme_options

    used = {k for stage in stages for k in stage.options}
    unused = sorted(k for k in request.options if k not in used and k != "hierarchical")
    if unused:
        final = stages[-1]  # its scheme says what it takes instead
        scheme_options(final.scheme).from_dict({**final.options, **{k: request.options[k] for k in unused}},
                                               final.scheme)
        schemes = ", ".join(sorted({s.scheme for s in stages}))
        raise UserError(f"option(s) {', '.join(unused)} apply to no stage of this plan (its schemes: {schemes})")


def _named(arch: str) -> Candidate:
    """A student named on the command line: not searched, measured only if a chain needs it."""
    return Candidate(arch, teacher_family_of(arch) or arch, 0, 0)


def _search(request: PlanRequest, subject: Subject, latency: LatencyFn | None, pruned: PrunedOffer | None,
            reasons: list[str]) -> tuple[Candidate, list[Candidate]]:
    """Every candidate measured against the budgets, and the student the rule (or the probe) picks."""
    from recipes.fill import fill_budget

    candidates = measure_candidates(subject.num_classes, subject.input_shape)
    if request.family is not None:
        known = sorted({c.family for c in candidates})
        if request.family not in known:
            raise UserError(f"no searchable family {request.family!r}; families: {', '.join(known)}")
        candidates = [c for c in candidates if c.family == request.family]
    grid_size = len(candidates)
    teacher_flops = subject.teacher_flops if request.teacher is not None else None
    filled = fill_budget(candidates, request.budgets, teacher_flops, subject.num_classes, subject.input_shape)
    candidates += filled.members
    candidates = _with_pruned(request, candidates, pruned, reasons)
    # a student is never larger than its teacher (checked with the budgets, before any latency is timed)
    apply_budgets(candidates, request.budgets, teacher_flops, latency)
    check_budget_range(candidates, request.budgets, teacher_flops,
                       subject.teacher_params if request.teacher is not None else None)
    if request.student is not None:
        student = next((c for c in candidates if c.name == request.student and c.fits), None)
        if student is None:
            raise UserError(f"{request.student} is not a fitting candidate for this budget")
        why = f"student {student.name} ({student.flops / 1e6:.2f} MFLOPs, {student.params / 1e6:.3f} M params)"
    else:
        student, why = _prefer_pruned(*pick(candidates, teacher_family_of(subject.teacher_arch), request.family),
                                      candidates)
    reasons.append(
        f"{len([c for c in candidates if c.fits])} of {len(candidates)} zoo candidates meet "
        + ", ".join(b.describe() for b in request.budgets)
        + " (FLOPs measured with fvcore, 1 multiply-add = 1 FLOP)"
    )
    if filled.probes:
        solved = ", ".join(f"{c.name} ({c.flops / 1e6:.3g} MFLOPs, {c.params / 1e6:.3g} M params)"
                           for c in filled.members)
        reasons.append(
            f"beside the {grid_size} grid models, {len(filled.members)} with a width solved to fill the budget"
            + (f": {solved}" if solved else "")
            + f" ({filled.measurements} widths measured over {len(filled.probes)} scalable families)"
        )
    uses = student.uses(request.budgets)
    reasons.append(f"{why}; {uses}" if uses else why)
    return student, candidates


def _prefer_pruned(student: Candidate, why: str, candidates: list[Candidate]) -> tuple[Candidate, str]:
    """Under the rule, the teacher pruned to the budget wins over the zoo whenever it fits: in
    ``benchmarks/pruned_vs_zoo.py`` (digits and Fashion-MNIST, 2x and 4x fewer FLOPs, 3 seeds) it
    matched or beat the largest zoo student distilled with the same epochs, often with fewer FLOPs
    (README, "Pruned teacher")."""
    pruned = next((c for c in candidates if c.pruned is not None and c.fits), None)
    if pruned is None or pruned is student:
        return student, why
    return pruned, (f"student {pruned.name}, {pruned.flops / 1e6:.2f} MFLOPs, {pruned.params / 1e6:.3f} M params: "
                    f"the teacher pruned to the budget fits and is preferred over the zoo's pick "
                    f"({display_name(student.name)}, {student.flops / 1e6:.2f} MFLOPs): pruned and distilled, it "
                    "matched or beat the zoo student in benchmarks/pruned_vs_zoo.py")


def _with_pruned(request: PlanRequest, candidates: list[Candidate], pruned: PrunedOffer | None,
                 reasons: list[str]) -> list[Candidate]:
    """``--candidates``: the zoo, the pruned teacher, or both; with no pruned candidate, the zoo."""
    if request.candidates == "zoo" or pruned is None:
        return candidates
    if request.candidates == "all" and request.recipe not in (None, "single"):
        reasons.append(f"no pruned candidate: --recipe {request.recipe} does not apply to a pruned teacher (its "
                       "recovery is one offline distillation from the unpruned teacher); the zoo competes alone")
        return candidates
    reasons.append(pruned.reason)
    candidate = pruned.candidate
    if candidate is not None and request.family is not None and candidate.family != request.family:
        reasons.append(f"the pruned candidate is a {candidate.family}, not of --family {request.family}: left out")
        candidate = None
    if candidate is None:
        return candidates  # falls back to the zoo (the reason says why)
    return [candidate] if request.candidates == "pruned" else [*candidates, candidate]


def preset_plan(preset: Preset, request: PlanRequest, data: str | None) -> Plan:
    """The preset with the request's teacher, data, seed, corruption, method and training settings
    written over its own (each where given); ``data`` is the resolved data spec (None: the preset's)."""
    raw = dict(preset.raw)
    if request.corruption is not None:
        raw["corruption"] = request.corruption.to_dict()
    for key, value in (("teacher", request.teacher), ("data", data), ("teacher_arch", request.teacher_arch)):
        if value is not None:
            raw[key] = value
    raw["seed"] = request.seed
    overrides = request.train.given()
    stages = []
    for i, stage in enumerate(raw_stages(raw.get("stages"))):
        stage = dict(stage)
        own = stage.get("train") or {}
        if not isinstance(own, dict):
            raise UserError(f"plan stage {i + 1}: train must be a mapping of training settings, got {own!r:.60}")
        stage["train"] = {**own, **overrides}
        stages.append(stage)
    raw["stages"] = stages
    if not raw.get("data"):
        raise UserError(f"preset {preset.name} names no data: give --data")
    plan = Plan.from_dict(raw)
    if request.method is None:
        return plan
    for stage in plan.stages:
        stage.method = request.method  # the command line's, as parsed
    return plan.validate()


# --------------------------------------------------------------------------------------- stages


def _stages(request: PlanRequest, subject: Subject, student: Candidate, candidates: list[Candidate],
            reasons: list[str]) -> list[Stage]:
    if request.teacher is None:
        return _online(request, subject, student, reasons)
    recipe = request.recipe
    if student.pruned is not None:
        if recipe not in (None, "single"):
            raise UserError(f"--recipe {recipe} does not apply to the pruned teacher {student.name}: its recovery "
                            "is one offline distillation from the unpruned teacher; use --candidates zoo for that recipe")
        reasons.append(f"{student.name} is the teacher with channels pruned away: recovery training is one offline "
                       f"distillation from the unpruned teacher, from the teacher's kept weights")
        return [_stage(request, subject, "student", "offline", subject.teacher_arch, [TEACHER], reasons[-1],
                       family=student.family, prune=dict(student.pruned))]
    if recipe == "modreduce":
        reasons.append("--recipe modreduce")
        return [_stage(request, subject, "student", "modreduce", student.name, [TEACHER], reasons[-1],
                       family=student.family)]
    if recipe == "tcn":
        return _tcn(request, subject, student, reasons)
    assistants = _assistants(request, subject, student, candidates, reasons)
    if not assistants:
        why = reasons[-1] if candidates else f"{student.name}: one offline distillation from the teacher"
        return [_stage(request, subject, "student", "offline", student.name, [TEACHER], why, family=student.family)]
    dgkd = recipe == "dgkd" or (recipe is None and request.chain is None and len(assistants) >= 2)
    stages, above = [], [TEACHER]
    for i, model in enumerate([*assistants, student]):
        name = "student" if model is student else f"ta{i + 1}"
        teachers = list(above) if dgkd else [above[-1]]
        size = f" ({model.flops / 1e6:.2f} MFLOPs)" if model.flops else ""
        stages.append(_stage(request, subject, name, "dgkd" if dgkd and len(teachers) > 1 else "offline",
                             model.name, teachers, f"{model.name}{size} learns from {', '.join(teachers)}",
                             family=model.family))
        above.append(name)
    return stages


def _assistants(request: PlanRequest, subject: Subject, student: Candidate, candidates: list[Candidate],
                reasons: list[str]) -> list[Candidate]:
    """The teacher assistants: the named chain, or those the gap rule inserts (none within it)."""
    recipe = request.recipe
    if request.chain is not None or (not candidates and recipe in ("takd", "dgkd")):
        chain = [c.strip() for c in request.chain or ()]
        if not chain or any(not c for c in chain):
            raise UserError("--chain needs one or more teacher-assistant architectures, e.g. --chain resnet56,resnet32")
        return check_chain_sizes(subject.teacher_flops, chain, student.name, subject.num_classes, subject.input_shape)
    if not candidates:
        return []  # a named student, distilled once
    teacher_flops = subject.teacher_flops
    gap = teacher_flops / student.flops
    if recipe in ("takd", "dgkd") or (recipe is None and gap > request.gap_threshold):
        wanted = max(1, math.ceil(math.log(gap) / math.log(request.gap_threshold)) - 1) if gap > 1 else 1
        if recipe == "dgkd":
            wanted = max(wanted, 2)
        assistants = choose_assistants(teacher_flops, student, candidates, wanted)
        if not assistants:
            if recipe:
                raise UserError(f"recipe {recipe!r} needs a teacher assistant between the teacher and {student.name}, "
                                "and no zoo model lies between them")
            reasons.append(f"capacity gap {gap:.1f}x exceeds {request.gap_threshold:g}x, but no zoo model lies "
                           "between teacher and student: distilling directly")
            return []
        steps = " -> ".join(["teacher", *(display_name(a.name) for a in assistants), display_name(student.name)])
        dgkd = recipe == "dgkd" or (recipe is None and len(assistants) >= 2)
        reasons.append(
            f"capacity gap {gap:.1f}x exceeds {request.gap_threshold:g}x: {len(assistants)} teacher assistant(s) at "
            f"geometric FLOPs steps ({steps}); "
            + ("DGKD: every stage learns from the teacher and all assistants above it, with random drops"
               if dgkd else "TAKD: each stage learns from the one above")
        )
        return assistants
    reasons.append(f"capacity gap {gap:.1f}x (teacher/student FLOPs) is within {request.gap_threshold:g}x: "
                   "one offline distillation, no teacher assistant")
    return []


def _online(request: PlanRequest, subject: Subject, student: Candidate, reasons: list[str]) -> list[Stage]:
    """No teacher: OSAKD self-distillation, or an online cohort (the attention aggregator by default)."""
    if request.recipe == "osakd":
        reasons.append("no teacher: OSAKD self-distillation (k-NN soft labels from the model's own outputs)")
        return [_stage(request, subject, "student", "osakd", student.name, [], reasons[-1], family=student.family)]
    from compressor.schemes.cohort import parse_peers

    peers = parse_peers(request.options.get("peers"))
    defaults = {k: v for k, v in DEFAULT_COHORT.items() if not (k == "cohort" and peers)}  # peers say N
    options = {**defaults, **request.options}
    size = len(peers) if peers else options["cohort"]
    reasons.append(f"no teacher: an online cohort of {size} peers with the {options['aggregator']} "
                   "aggregator; the best peer on the validation split is deployed")
    return [_stage(request, subject, "student", "cohort", student.name, [], reasons[-1], family=student.family,
                   options=options)]


def _tcn(request: PlanRequest, subject: Subject, student: Candidate, reasons: list[str]) -> list[Stage]:
    """Teacher-class network: one stage, or one per level when hierarchical (1 -> 2 -> 4 ... students)."""
    from compressor.schemes.tcn import TCNOptions, tcn_levels

    options = {k: v for k, v in request.options.items() if k != "hierarchical"}  # a layout, not a stage's option
    levels = tcn_levels(TCNOptions.from_dict(options, "tcn").students, bool(request.options.get("hierarchical")))
    reasons.append(f"teacher-class network: {' -> '.join(['teacher', *(str(level.students) for level in levels)])} "
                   "student(s)")
    return [_stage(request, subject, "student" if i == len(levels) - 1 else level.name, "tcn", student.name,
                   [level.teacher], f"{level.students} student(s) regress the embedding of {level.teacher}",
                   family=student.family, options={**options, "students": level.students})
            for i, level in enumerate(levels)]


def _stage(request: PlanRequest, subject: Subject, name: str, scheme: str, arch: str, teachers: list[str],
           reason: str, *, family: str | None = None, options: dict[str, Any] | None = None,
           prune: dict[str, Any] | None = None) -> Stage:
    """One stage: the scheme's options from the request, its method, and its training settings (the
    data's protocol, the scheme's own defaults, then the command line's)."""
    from compressor.schemes.registry import scheme_options
    from compressor.trainer.config import TrainConfig

    spec = scheme_options(scheme)
    options = dict(request.options if options is None else options)
    takes = {*spec.field_names(), *spec.extra_names(options)}
    options = {k: v for k, v in options.items() if k in takes}  # the rest is another stage's (or refused)
    if prune is not None:
        options["prune"] = prune
    settings = default_train(subject.data, arch, family, distill=spec.knowledge_terms and bool(teachers),
                             scheme_defaults=spec.train_defaults, **request.train.given())
    return Stage(name, scheme, arch, teachers, _method(request, scheme), options,
                 TrainConfig.from_dict({"seed": request.seed, **settings}), reason)


def _method(request: PlanRequest, scheme: str) -> "MethodSpec | None":
    from compressor.knowledge.spec import parse_method_spec
    from compressor.schemes.registry import scheme_options

    spec = scheme_options(scheme)
    if not spec.takes_method:
        if request.method is not None:
            spec.refuse_method(scheme, request.method)
        return None
    return request.method or request.default_method or parse_method_spec(spec.default_method)


def choose_assistants(teacher_flops: int, student: Candidate, candidates: list[Candidate], count: int) -> list[Candidate]:
    """TAs nearest (in log FLOPs) to geometric steps between teacher and student.

    Same family as the student where possible (its members differ only in size, which is what
    TAKD's assistants do), strictly between the two in FLOPs, each used once.
    """
    between = [c for c in candidates if student.flops < c.flops < teacher_flops]
    same = [c for c in between if c.family == student.family]
    pool = same or between
    chosen: list[Candidate] = []
    for i in range(1, count + 1):
        target = teacher_flops * (student.flops / teacher_flops) ** (i / (count + 1))
        options = [c for c in pool if c not in chosen and (not chosen or c.flops < chosen[-1].flops)]
        if not options:
            break
        chosen.append(min(options, key=lambda c: (abs(math.log(c.flops / target)), c.params)))
    return chosen


def check_chain_sizes(teacher_flops: int | None, chain: Sequence[str], student: str, num_classes: int,
                      shape: tuple[int, int, int]) -> list[Candidate]:
    """Each link must be smaller than the one above it and larger than the student (by FLOPs); the
    links, measured."""
    from compressor.cost import measure_arch

    student_flops = measure_arch(student, num_classes, shape).flops
    previous_name, previous = "the teacher", teacher_flops
    links = []
    for arch in chain:
        cost = measure_arch(arch, num_classes, shape)
        flops = cost.flops
        if previous is not None and flops >= previous:
            raise UserError(f"teacher assistant {arch} ({flops / 1e6:.2f} MFLOPs) is not smaller than "
                            f"{previous_name} ({previous / 1e6:.2f} MFLOPs)")
        if flops <= student_flops:
            raise UserError(f"teacher assistant {arch} ({flops / 1e6:.2f} MFLOPs) is not larger than the "
                            f"student {student} ({student_flops / 1e6:.2f} MFLOPs)")
        links.append(Candidate(arch, teacher_family_of(arch) or arch, flops, cost.params))
        previous_name, previous = arch, flops
    return links
