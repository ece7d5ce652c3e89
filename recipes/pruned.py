"""The pruned-teacher candidate: the teacher itself, its channels pruned to the budget (issue 14).

It competes in the student search beside the zoo (``--candidates zoo|pruned|all``) with its
measured FLOPs and params (and, for a latency budget, its timed ONNX latency), and under the rule
search it wins like any candidate: when it fits and has the most FLOPs among the preferred family
(it is of the teacher's family by construction). If chosen, its recovery training is one offline
distillation from the unpruned teacher, starting from the teacher's kept weights.

A budget pruning cannot reach, or a teacher whose graph Torch-Pruning cannot follow, is not an
error here: the planner says why in one line and falls back to the zoo.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from compressor.checkpoint import LoadedModel
from compressor.errors import UserError
from compressor.models import list_models, model_family
from compressor.pruning import PruneSettings, describe, prune_to_budget, replay
from recipes.budget import Budget, cost_limits
from recipes.search import Candidate

def pruned_name(arch: str) -> str:
    return f"{arch}-pruned"


def pruned_candidate(
    teacher: LoadedModel,
    budgets: Sequence[Budget],
    input_shape: Sequence[int],
    teacher_flops: int | None = None,
    latency_of_model: Callable[[nn.Module], float] | None = None,
    settings: PruneSettings = PruneSettings(),
) -> tuple[Candidate | None, str]:
    """(the candidate or None, the sentence for the plan's reasons)."""
    arch = teacher.meta.arch
    if arch not in list_models():
        return None, (f"no pruned candidate: the teacher is {arch}, not a zoo architecture, so a pruned copy "
                      "could not be rebuilt from its checkpoint; the zoo candidates compete alone")
    limits = cost_limits(budgets, teacher_flops)
    flops_limits = [limit for _, metric, limit in limits if metric == "flops"]
    params_limits = [limit for _, metric, limit in limits if metric == "params"]
    timed: dict[int, float] = {}
    check = None
    latency_limits = [b.value for b in budgets if b.timed]
    if latency_limits and latency_of_model is not None:
        limit_ms = min(latency_limits)

        def within_latency(model: nn.Module) -> bool:  # timed, never estimated: each trial that fits the rest
            timed[id(model)] = float(latency_of_model(model))
            return timed[id(model)] <= limit_ms

        check = (f"{limit_ms:g} ms at batch 1", within_latency)
    if not flops_limits and not params_limits and check is None:
        return None, "no pruned candidate: pruning is solved for a FLOPs, params or latency budget, and none was given"
    try:
        result = prune_to_budget(teacher.model, input_shape, max_flops=min(flops_limits, default=None),
                                 max_params=min(params_limits, default=None), settings=settings, name=arch,
                                 check=check)
    except UserError as err:
        return None, f"no pruned candidate ({err}); falling back to the zoo"
    record = dict(result.record)
    # a teacher that is itself pruned: its own steps come first in the history; the student replays the rest
    record["teacher_steps"] = len((getattr(teacher.model, "kd_pruning", None) or {}).get("history", []))
    candidate = Candidate(pruned_name(arch), _family(arch), result.cost.flops, result.cost.params)
    candidate.pruned = record
    if check is not None:
        candidate.latency_ms = timed.get(id(result.model)) or float(latency_of_model(result.model))
        candidate.timed = True
    why = (f"pruned candidate {candidate.name}: {describe(record)}, {result.cost.flops / 1e6:.3g} MFLOPs and "
           f"{result.cost.params / 1e6:.3g} M params (teacher {result.teacher_cost.flops / 1e6:.3g} MFLOPs)")
    return candidate, why


def student_from_teacher(teacher: nn.Module, record: dict) -> nn.Module:
    """The pruned student's starting point: a copy of the teacher with the recorded channels removed,
    so recovery training starts from the teacher's own kept weights."""
    import copy

    student = copy.deepcopy(teacher).cpu().eval()
    steps = int(record.get("teacher_steps", 0))
    replay(student, {**record, "history": list(record.get("history", []))[steps:]}, "the plan")
    student.kd_pruning = dict(record)
    return student


def _family(arch: str) -> str:
    try:
        return model_family(arch)
    except UserError:
        return arch
