"""The product as Python calls: plan a compression, run it. The CLI is a thin shell over these.

    plan, inputs = plan_compression(teacher="resnet110.pt", budgets=["2MFLOPs"])
    plan, inputs = plan_compression(PlanRequest(...))      # a request built already

Every keyword is a :class:`~recipes.request.PlanRequest` field (or ``epochs``/``lr``/``batch_size``),
given as a user would type it; it is parsed once, here.
"""

from __future__ import annotations

from typing import Any

from recipes.budget import parse_budgets
from recipes.context import RunInputs, inputs_for
from recipes.plan import Plan
from recipes.planner import DEFAULT_METHOD, PrunedOffer, make_plan
from recipes.request import PlanRequest


def main_request(**values: Any) -> PlanRequest:
    """A request as the main command and ``kdcompress plan`` make it: their default method is
    ``hinton+crd`` (``kdcompress distill`` trains with the scheme's own, ``hinton``). Without a
    preset, at least one budget is asked for, before anything is read."""
    if not values.get("preset"):
        values["budgets"] = parse_budgets(values.get("budgets") or ())
    return PlanRequest.from_user(**{"default_method": DEFAULT_METHOD, **values})


def plan_compression(request: PlanRequest | None = None, /, *, load_data: bool = False,
                     **values: Any) -> tuple[Plan, RunInputs | None]:
    """Plan without training: seconds, not minutes (costs are cached on disk). ``load_data`` opens
    the data even when the teacher records its shape (the run needs it; a plan alone does not).
    A preset with neither a teacher nor data is shown as written: there are no inputs to resolve."""
    request = request if request is not None else main_request(**values)
    if request.preset is not None and request.teacher is None and request.data is None and not load_data:
        from recipes.planner import preset_plan

        return preset_plan(request.preset, request, None), None
    inputs = inputs_for(request, load_data=load_data)
    return plan_with(request, inputs), inputs


def plan_with(request: PlanRequest, inputs: RunInputs) -> Plan:
    """The one planner on resolved inputs, with what a search needs measured first: the latency
    probe for a latency budget, the pruned teacher when ``--candidates`` asks for it."""
    latency = None
    searched = request.preset is None and bool(request.budgets)
    if searched and any(b.timed for b in request.budgets):
        from recipes.latency_probe import zoo_latency_probe

        latency = zoo_latency_probe(inputs.num_classes, inputs.input_shape, threads=request.latency_threads)
    pruned = _pruned(request, inputs) if searched and request.candidates != "zoo" else None
    return make_plan(request, inputs, latency=latency, pruned=pruned)


def _pruned(request: PlanRequest, inputs: RunInputs) -> PrunedOffer:
    """The teacher pruned to the budget, as a candidate (None and the reason when there is none)."""
    from recipes.pruned import pruned_candidate

    if inputs.teacher is None:
        return PrunedOffer(None, "no pruned candidate: there is no teacher to prune")
    timer = None
    if any(b.timed for b in request.budgets):
        from recipes.latency_probe import module_latency_probe

        timer = module_latency_probe(inputs.input_shape, threads=request.latency_threads)
    return PrunedOffer(*pruned_candidate(inputs.teacher, request.budgets, inputs.input_shape, inputs.teacher_flops,
                                         timer))
