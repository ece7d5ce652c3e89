"""Students that fill the budget: width-solved members, measured, fitting, and most of the budget used."""

from __future__ import annotations

import re

import pytest

from compressor.cost import measure, measure_arch
from compressor.errors import UserError
from compressor.models import create, model_family, resolve
from recipes.budget import parse_budgets
from recipes.fill import MAX_PROBES, fill_budget
from recipes.planner import Facts, make_plan
from recipes.request import PlanRequest
from recipes.search import Candidate

FMNIST, DIGITS = (1, 28, 28), (1, 8, 8)


pytestmark = pytest.mark.usefixtures("cache_dir")  # one cost cache for the module, away from the user's


def _plan(shape, budgets, teacher_arch=None, family=None, latency=None):
    teacher = measure_arch(teacher_arch, 10, shape) if teacher_arch else None
    return make_plan(
        PlanRequest(budgets=parse_budgets(budgets), teacher="t.pt" if teacher_arch else None, family=family),
        Facts("digits", 10, shape, teacher_arch=teacher_arch, teacher_flops=teacher.flops if teacher else None,
              teacher_params=teacher.params if teacher else None),
        latency=latency)


def _measured(arch: str, shape) -> int:
    """The chosen student's FLOPs, measured afresh from the name (not read from the plan)."""
    return measure(create(arch, num_classes=10, in_chans=shape[0]), shape).flops


@pytest.mark.parametrize("shape, budget, limit, teacher", [
    (FMNIST, "2MFLOPs", 2e6, "resnet20"),  # the grid's best here was osakd_cnn5 at 0.30 MFLOPs (15%)
    (FMNIST, "2MFLOPs", 2e6, None),
    (DIGITS, "1MFLOPs", 1e6, "resnet110"),  # the grid's best here was resnet_d26_w0.5 at 0.87 MFLOPs
])
def test_the_chosen_student_uses_most_of_a_flops_budget(shape, budget, limit, teacher):
    plan = _plan(shape, [budget], teacher)
    flops = _measured(plan.final.arch, shape)
    assert 0.85 * limit <= flops <= limit, (plan.final.arch, flops)
    if teacher:  # the pick rule still prefers the teacher's family
        assert model_family(plan.final.arch) == model_family(teacher)
    chosen = next(c for c in plan.candidates if c["name"] == plan.final.arch)
    assert chosen["flops"] == flops and chosen["fits"]
    assert chosen["utilization"][budget] == pytest.approx(flops / limit)
    stated = re.search(rf"uses (\d+)% of <= {limit / 1e6:g} MFLOPs", " ".join(plan.reasons))
    assert stated and int(stated.group(1)) == round(100 * flops / limit)


def test_a_params_budget_is_filled_too():
    plan = _plan(DIGITS, ["0.05Mparams"], "resnet110")
    params = sum(p.numel() for p in create(plan.final.arch, num_classes=10, in_chans=1).parameters())
    assert 0.85 * 0.05e6 <= params <= 0.05e6
    assert any(re.search(r"uses \d+% of <= 0.05 M params", r) for r in plan.reasons)


def test_solved_members_are_measured_fitting_and_few():
    budgets = parse_budgets(["2MFLOPs"])
    grid = [Candidate(n, model_family(n), *_cost(n)) for n in
            ("resnet_d8_w0.5", "resnet_d8_w1", "resnet_d14_w0.5", "vgg8_w0.25", "osakd_cnn5")]
    result = fill_budget(grid, budgets, None, 10, FMNIST)
    assert {m.family for m in result.members} == {"resnet_cifar", "vgg"}  # osakd_cnn does not scale
    for m in result.members:
        assert m.solved and (m.flops, m.params) == _cost(m.name) and m.flops <= 2e6
        assert resolve(m.name).family == m.family
    # resnet: no grid member fits, so the smallest (depth 8) is narrowed; its depth is kept
    assert re.fullmatch(r"resnet_d8_w0\.\d+", next(m.name for m in result.members if m.family == "resnet_cifar"))
    assert all(0 < n <= MAX_PROBES for n in result.probes.values())


def test_past_the_grid_a_width_at_most_doubles():
    grid = [Candidate("mobilenetv2_w1.4", "mobilenetv2", *_cost("mobilenetv2_w1.4"))]
    result = fill_budget(grid, parse_budgets(["1GFLOPs"]), None, 10, FMNIST)
    assert [m.name for m in result.members] == ["mobilenetv2_w2.8"] and result.measurements == 1


def test_solved_members_are_timed_like_the_grid_under_a_latency_budget():
    timed = []

    def latency(name: str) -> float:  # a stand-in for onnxruntime: 1 ms per MFLOP, never below the grid's
        timed.append(name)
        return measure_arch(name, 10, DIGITS).flops / 1e6

    plan = _plan(DIGITS, ["1MFLOPs", "0.9ms"], "resnet110", family="resnet_cifar", latency=latency)
    solved = next(c for c in plan.candidates if c["solved"])
    assert solved["name"] in timed and solved["rejected_by"] == ["0.9ms"]  # 0.94 MFLOPs -> 0.94 ms
    assert plan.final.arch == "resnet_d26_w0.5" and len(timed) <= 4  # the largest grid member under 0.9 ms


def test_a_latency_only_budget_solves_nothing():
    grid = [Candidate("resnet_d8_w0.5", "resnet_cifar", *_cost("resnet_d8_w0.5"))]
    result = fill_budget(grid, parse_budgets(["5ms"]), None, 10, FMNIST)
    assert result.members == [] and result.measurements == 0


def test_a_budget_below_every_model_is_still_one_clear_error():
    # resnet's narrowest width (0.25) at 28x28 is over 0.5 MFLOPs: nothing solved fits either
    with pytest.raises(UserError, match=r"no student fits 0.1MFLOPs.*: the smallest candidate, osakd_cnn5, costs 0.30"):
        _plan(FMNIST, ["0.1MFLOPs"], "resnet20")


def _cost(name: str) -> tuple[int, int]:
    cost = measure_arch(name, 10, FMNIST)
    return cost.flops, cost.params
