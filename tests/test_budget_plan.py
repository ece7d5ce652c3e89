"""Budget strings, plan YAML round-trips and hand-written plan validation."""

from __future__ import annotations

import pytest

from compressor.errors import UserError
from recipes.budget import parse_budget, parse_budgets
from recipes.plan import Plan, Stage


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("0.1GFLOPs", "flops", 1e8),
        ("100MFLOPs", "flops", 1e8),
        ("100M FLOPs", "flops", 1e8),
        ("100 mflops", "flops", 1e8),
        ("2e6 flops", "flops", 2e6),
        ("1.5Mparams", "params", 1.5e6),
        ("300K params", "params", 3e5),
        ("250000 params", "params", 2.5e5),
        ("5ms", "latency", 5.0),
        ("800us", "latency", 0.8),
        ("0.002s", "latency", 2.0),
        ("10x", "factor", 10.0),
        ("2.5X", "factor", 2.5),
    ],
)
def test_good_budgets(text, kind, value):
    budget = parse_budget(text)
    assert budget.kind == kind and budget.value == pytest.approx(value) and budget.text == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("abc", "accepted forms"),
        ("100", "accepted forms"),
        ("5 fps", "accepted forms"),
        ("-3ms", "accepted forms"),
        ("0 flops", "positive"),
        ("1x", "above 1"),
        ("0.5x", "above 1"),
        ("10 MB", "accepted forms"),
    ],
)
def test_bad_budgets(text, message):
    with pytest.raises(UserError, match=message):
        parse_budget(text)


def test_no_budget_and_relative_budget_without_teacher():
    with pytest.raises(UserError, match="at least one"):
        parse_budgets([])
    assert parse_budget("10x").flops_limit(255e6) == pytest.approx(25.5e6)
    with pytest.raises(UserError, match="--teacher"):
        parse_budget("10x").flops_limit(None)


def _plan() -> Plan:
    return Plan(
        data="digits", teacher="t.pt", teacher_arch="resnet110", budgets=["2MFLOPs"], recipe="takd",
        stages=[
            Stage("ta1", "offline", "resnet32", ["teacher"], "hinton+crd", {}, {"epochs": 3, "lr": 0.05}, "why"),
            Stage("student", "offline", "resnet8", ["ta1"], "hinton", {"loss_options": {"hinton": {"temperature": 4}}},
                  {"epochs": 3}, "why"),
        ],
        reasons=["a", "b"], candidates=[{"name": "resnet8", "flops": 1, "fits": True}],
    )


def test_plan_yaml_round_trip(tmp_path):
    plan = _plan()
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan
    plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == plan


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["stages"][1].update(teachers=["ta9"]), "not an earlier stage"),
        (lambda d: d["stages"][1].update(name="ta1"), "used twice"),
        (lambda d: d.update(teacher=None), "names none"),
        (lambda d: d.update(stages=[]), "no stages"),
        (lambda d: d.update(colour="red"), "unknown plan field"),
        (lambda d: d["stages"][0].pop("arch"), "needs 'name', 'scheme' and 'arch'"),
    ],
)
def test_hand_written_plan_errors(mutate, message):
    data = _plan().to_dict()
    mutate(data)
    with pytest.raises(UserError, match=message):
        Plan.from_dict(data)


def test_plan_that_is_not_yaml():
    with pytest.raises(UserError, match="not valid YAML"):
        Plan.from_yaml("stages: [unclosed")
