"""The product as Python calls: plan a compression, run it. The CLI is a thin shell over these."""

from __future__ import annotations

from typing import Sequence

from compressor.data.corruptions import Corruption
from recipes.budget import parse_budgets
from recipes.context import RunInputs, resolve_inputs
from recipes.plan import Plan
from recipes.planner import PlanRequest, make_plan
from recipes.pruned import parse_candidates


def plan_compression(
    *,
    teacher: str | None,
    budgets: Sequence[str],
    data: str | None = None,
    teacher_arch: str | None = None,
    recipe: str | None = None,
    method: str | None = None,
    family: str | None = None,
    gap_threshold: float = 8.0,
    epochs: int | None = None,
    seed: int = 0,
    latency_threads: int = 1,
    trust: bool = False,
    options: dict | None = None,
    load_data: bool = False,
    student: str | None = None,
    corruption: Corruption | None = None,
    candidates: str | None = None,
) -> tuple[Plan, RunInputs]:
    """Plan without training: seconds, not minutes (costs are cached on disk). The plan records
    ``corruption`` (the training-label corruptions every stage trains with)."""
    parsed = parse_budgets(budgets)
    which = parse_candidates(candidates)
    inputs = resolve_inputs(teacher, data, arch=teacher_arch, trust=trust, load_data=load_data, seed=seed,
                            corruption=corruption)
    latency = None
    if any(b.timed for b in parsed):
        from recipes.latency_probe import zoo_latency_probe

        latency = zoo_latency_probe(inputs.num_classes, inputs.input_shape, threads=latency_threads)
    request = PlanRequest(
        data=inputs.data_spec, budgets=parsed, input_shape=inputs.input_shape, num_classes=inputs.num_classes,
        teacher=teacher, teacher_arch=inputs.teacher.meta.arch if inputs.teacher else None,
        teacher_flops=inputs.teacher_cost.flops if inputs.teacher_cost else None,
        teacher_params=inputs.teacher_cost.params if inputs.teacher_cost else None,
        recipe=recipe, method=method, family=family, gap_threshold=gap_threshold, epochs=epochs, seed=seed,
        options=dict(options or {}), student=student, candidates=which,
    )
    if which != "zoo":
        request.pruned, request.pruned_reason = _pruned(inputs, parsed, latency_threads)
    plan = make_plan(request, latency)
    plan.corruption = inputs.corruption.to_dict()
    if not inputs.corruption.clean:
        plan.reasons.append(f"every stage trains on corrupted labels: {inputs.corruption} at seed {seed} "
                            "(val and test stay clean)")
    return plan, inputs


def _pruned(inputs: RunInputs, budgets, latency_threads: int):
    """The teacher pruned to the budget, as a candidate (None and the reason when there is none)."""
    from recipes.pruned import pruned_candidate

    if inputs.teacher is None:
        return None, "no pruned candidate: there is no teacher to prune"
    timer = None
    if any(b.timed for b in budgets):
        from recipes.latency_probe import module_latency_probe

        timer = module_latency_probe(inputs.input_shape, threads=latency_threads)
    return pruned_candidate(inputs.teacher, budgets, inputs.input_shape,
                            inputs.teacher_cost.flops if inputs.teacher_cost else None, timer)
