"""The planner: (teacher, budget, data) -> a Plan, with a reason for every choice.

Recipe rule: capacity gap = teacher FLOPs / student FLOPs. Above ``gap_threshold`` (default 8)
teacher assistants are inserted at roughly geometric steps of FLOPs between teacher and student
(Mirzadeh et al. 2020, TAKD), as many as it takes for each step to be within the threshold; with
two or more TAs every stage learns from all the models above it (Son et al. 2021, DGKD). Without
a teacher the recipe is an online cohort with the attention aggregator (or OSAKD on request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from compressor.errors import UserError
from compressor.schemes.modreduce import MODREDUCE_TRAIN_DEFAULTS, check_no_method
from recipes.budget import Budget
from recipes.fill import fill_budget
from recipes.plan import TEACHER, Plan, Stage
from recipes.protocols import default_train
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

RECIPES = ("single", "takd", "dgkd", "modreduce", "cohort", "osakd", "tcn")
DEFAULT_METHOD = "hinton+crd"
DEFAULT_GAP_THRESHOLD = 8.0


@dataclass
class PlanRequest:
    data: str
    budgets: Sequence[Budget]
    input_shape: tuple[int, int, int]
    num_classes: int
    teacher: str | None = None  # path
    teacher_arch: str | None = None
    teacher_flops: int | None = None
    teacher_params: int | None = None
    recipe: str | None = None  # forced scheme, else chosen by the gap rule
    method: str | None = None
    family: str | None = None
    gap_threshold: float = DEFAULT_GAP_THRESHOLD
    epochs: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)  # scheme options passed through (cohort size, k, drop...)
    student: str | None = None  # force this candidate (the probe search's winner)
    candidates: str = "zoo"  # "zoo" | "pruned" | "all" (recipes.pruned.CANDIDATE_SETS)
    pruned: Candidate | None = None  # the teacher pruned to the budget, measured (recipes.pruned)
    pruned_reason: str | None = None  # why it is there, or why there is none


def make_plan(request: PlanRequest, latency: LatencyFn | None = None) -> Plan:
    if request.recipe is not None and request.recipe not in RECIPES:
        raise UserError(f"unknown recipe {request.recipe!r}; known: {', '.join(RECIPES)}")
    if request.teacher is None and request.recipe in ("single", "takd", "dgkd", "modreduce", "tcn"):
        raise UserError(f"recipe {request.recipe!r} distils from a teacher: give --teacher")
    if request.recipe == "modreduce":
        check_no_method(request.method)
    reasons: list[str] = []
    candidates = measure_candidates(request.num_classes, request.input_shape)
    if request.family is not None:
        known = sorted({c.family for c in candidates})
        if request.family not in known:
            raise UserError(f"no searchable family {request.family!r}; families: {', '.join(known)}")
        candidates = [c for c in candidates if c.family == request.family]
    grid_size = len(candidates)
    filled = fill_budget(candidates, request.budgets, request.teacher_flops, request.num_classes, request.input_shape)
    candidates += filled.members
    candidates = _with_pruned(request, candidates, reasons)
    # a student is never larger than its teacher (checked with the budgets, before any latency is timed)
    apply_budgets(candidates, request.budgets, request.teacher_flops, latency)
    check_budget_range(candidates, request.budgets, request.teacher_flops, request.teacher_params)
    family = teacher_family_of(request.teacher_arch)
    if request.student is not None:
        student = next((c for c in candidates if c.name == request.student and c.fits), None)
        if student is None:
            raise UserError(f"{request.student} is not a fitting candidate for this budget")
        why = f"student {student.name} ({student.flops / 1e6:.2f} MFLOPs, {student.params / 1e6:.3f} M params)"
    else:
        student, why = pick(candidates, family, request.family)
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
    stages, recipe = _stages(request, student, candidates, reasons)
    clip = stages[-1].train.get("grad_clip") if request.teacher is not None else None
    if clip:
        reasons.append(f"distillation stages clip the gradient norm at {clip:g}: the KD gradient grows with the "
                       "teacher-student logit gap and can kill a student without BatchNorm (recipes/protocols.py)")
    return Plan(
        data=request.data, stages=stages, teacher=request.teacher, teacher_arch=request.teacher_arch,
        budgets=[b.text for b in request.budgets], recipe=recipe, seed=request.seed, reasons=reasons,
        candidates=[c.to_dict() for c in sorted(candidates, key=lambda c: c.flops)],
    ).validate()


def _with_pruned(request: PlanRequest, candidates: list[Candidate], reasons: list[str]) -> list[Candidate]:
    """``--candidates``: the zoo, the pruned teacher, or both; with no pruned candidate, the zoo."""
    if request.candidates == "zoo":
        return candidates
    if request.pruned_reason:
        reasons.append(request.pruned_reason)
    pruned = request.pruned
    if pruned is not None and request.family is not None and pruned.family != request.family:
        reasons.append(f"the pruned candidate is a {pruned.family}, not of --family {request.family}: left out")
        pruned = None
    if pruned is None:
        return candidates  # falls back to the zoo (the reason says why)
    return [pruned] if request.candidates == "pruned" else [*candidates, pruned]


def _train(request: PlanRequest, arch: str, family: str, *, distill: bool) -> dict:
    return default_train(request.data, arch, family, distill=distill, epochs=request.epochs)


def _stages(request: PlanRequest, student: Candidate, candidates: list[Candidate], reasons: list[str]):
    method = request.method or DEFAULT_METHOD
    opts = dict(request.options)
    final_train = _train(request, student.name, student.family, distill=request.teacher is not None)
    if request.teacher is None:
        recipe = request.recipe or "cohort"
        if recipe == "osakd":
            reasons.append("no teacher: OSAKD self-distillation (k-NN soft labels from the model's own outputs)")
            return [Stage("student", "osakd", student.name, [], None, opts, final_train, reasons[-1])], recipe
        opts.setdefault("cohort", 3)
        opts.setdefault("aggregator", "attention")
        reasons.append(f"no teacher: an online cohort of {opts['cohort']} peers with the {opts['aggregator']} "
                       "aggregator; the best peer on the validation split is deployed")
        return [Stage("student", "cohort", student.name, [], None, opts, final_train, reasons[-1])], "cohort"

    if student.pruned is not None:
        if request.recipe not in (None, "single"):
            raise UserError(f"--recipe {request.recipe} does not apply to the pruned teacher {student.name}: its recovery "
                            "is one offline distillation from the unpruned teacher; use --candidates zoo for that recipe")
        reasons.append(f"{student.name} is the teacher with channels pruned away: recovery training is one offline "
                       f"distillation from the unpruned teacher, from the teacher's kept weights")
        options = {**opts, "prune": dict(student.pruned)}
        return [Stage("student", "offline", request.teacher_arch, [TEACHER], method, options, final_train,
                      reasons[-1])], "pruned"
    gap = request.teacher_flops / student.flops
    forced = request.recipe
    if forced in ("modreduce", "tcn"):
        reasons.append(f"--recipe {forced}")
        if forced == "modreduce":
            final_train = {**final_train, **MODREDUCE_TRAIN_DEFAULTS}
        return [Stage("student", forced, student.name, [TEACHER], None, opts, final_train, reasons[-1])], forced
    if forced == "osakd" or forced == "cohort":
        raise UserError(f"recipe {forced!r} trains without a teacher: drop --teacher")
    assistants: list[Candidate] = []
    if forced in ("takd", "dgkd") or (forced is None and gap > request.gap_threshold):
        wanted = max(1, math.ceil(math.log(gap) / math.log(request.gap_threshold)) - 1) if gap > 1 else 1
        if forced == "dgkd":
            wanted = max(wanted, 2)
        assistants = choose_assistants(request.teacher_flops, student, candidates, wanted)
        if not assistants:
            if forced:
                raise UserError(f"recipe {forced!r} needs a teacher assistant between the teacher and {student.name}, "
                                "and no zoo model lies between them")
            reasons.append(f"capacity gap {gap:.1f}x exceeds {request.gap_threshold:g}x, but no zoo model lies "
                           "between teacher and student: distilling directly")
    else:
        reasons.append(f"capacity gap {gap:.1f}x (teacher/student FLOPs) is within {request.gap_threshold:g}x: "
                       "one offline distillation, no teacher assistant")
    if not assistants:
        return [Stage("student", "offline", student.name, [TEACHER], method, opts, final_train, reasons[-1])], "single"
    recipe = forced or ("dgkd" if len(assistants) >= 2 else "takd")
    steps = " -> ".join(["teacher", *(display_name(a.name) for a in assistants), display_name(student.name)])
    reasons.append(
        f"capacity gap {gap:.1f}x exceeds {request.gap_threshold:g}x: {len(assistants)} teacher assistant(s) at "
        f"geometric FLOPs steps ({steps}); "
        + ("DGKD: every stage learns from the teacher and all assistants above it, with random drops"
           if recipe == "dgkd" else "TAKD: each stage learns from the one above")
    )
    stages, above = [], [TEACHER]
    for i, model in enumerate([*assistants, student]):
        name = "student" if model is student else f"ta{i + 1}"
        teachers = list(above) if recipe == "dgkd" else [above[-1]]
        scheme = "dgkd" if recipe == "dgkd" and len(teachers) > 1 else "offline"
        stage_reason = f"{model.name} ({model.flops / 1e6:.2f} MFLOPs) learns from {', '.join(teachers)}"
        stages.append(Stage(name, scheme, model.name, teachers, method, dict(opts),
                            _train(request, model.name, model.family, distill=True), stage_reason))
        above.append(name)
    return stages, recipe


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
