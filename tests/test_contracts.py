"""The typed contracts of issue 16: every setting a plan records is used or refused, one planner
for every entry point, and the registries a new budget kind or data source plugs into."""

from __future__ import annotations

import pytest

from compressor.errors import UserError
from recipes.plan import Plan, Stage
from recipes.planner import Facts, make_plan

DIGITS = Facts("digits", 10, (1, 8, 8), teacher_arch="resnet110", teacher_flops=15_940_000)
pytestmark = pytest.mark.usefixtures("cache_dir")  # a named chain is measured: a cost cache away from the user's


def _plan(stage: dict, **plan) -> Plan:
    return Plan.from_dict({"data": "digits", "teacher": "t.pt", "stages": [stage], **plan})


@pytest.mark.parametrize("stage, message", [
    ({"options": {"x": 1}}, "the offline scheme takes no option 'x'; it takes loss_options, prune"),
    ({"scheme": "cohort", "teachers": [], "options": {"aggregator": "dml", "hidden": 8}},
     "the cohort scheme takes no option 'hidden'"),
    ({"scheme": "cohort", "teachers": [], "options": {"aggregator": "attn"}}, "unknown aggregator 'attn'"),
    ({"scheme": "osakd", "teachers": [], "method": "hinton"}, "the osakd scheme takes no --method"),
    ({"scheme": "vanilla"}, "learns from no teacher: drop its teachers"),
    ({"teachers": []}, "learns from a teacher: give it teachers"),
    ({"scheme": "dgkd", "options": {"drop_rate": 1.5}}, "drop rate"),
    ({"scheme": "tcn", "options": {"hierarchical": True}}, "one tcn stage per level"),
    ({"train": {"extra": {"phase": "init"}}}, "train.extra"),
])
def test_a_setting_the_scheme_would_not_use_is_refused_when_the_plan_is_built(stage, message):
    base = {"name": "student", "scheme": "offline", "arch": "resnet8", "teachers": ["teacher"], "train": {"epochs": 1}}
    with pytest.raises(UserError, match=message):
        _plan({**base, **stage})


def test_the_recipe_is_read_off_the_stages_and_a_plan_that_says_otherwise_is_refused():
    stage = {"name": "student", "scheme": "offline", "arch": "resnet8", "teachers": ["teacher"]}
    assert _plan(stage).recipe == "single"
    assert _plan(stage, recipe="single").recipe == "single"
    with pytest.raises(UserError, match="says recipe 'takd' but its stages make 'single'"):
        _plan(stage, recipe="takd")
    with pytest.raises(UserError, match="plan version 2"):
        _plan(stage, version=2)


def test_a_stage_trains_with_the_plans_seed_unless_it_names_its_own_and_its_settings_round_trip():
    plan = Plan(data="digits", seed=7, stages=[Stage("a", "vanilla", "resnet8", train={"epochs": 2}),
                                               Stage("b", "vanilla", "resnet8", train={"epochs": 2, "seed": 3})])
    assert [s.train.seed for s in plan.stages] == [7, 3]
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan and again.stages[0].train.epochs == 2


def test_each_entry_point_has_its_own_method_default_and_records_it():
    from recipes.api import main_request
    from recipes.distill_run import distill_request
    from recipes.request import PlanRequest

    distilled = make_plan(distill_request(teacher="t.pt", student="resnet8"), DIGITS)
    assert distilled.final.method.text == "hinton" and distilled.recipe == "single"
    main = main_request(teacher="t.pt", budgets=["1MFLOPs"])
    assert main.default_method.text == "hinton+crd" and main.method is None
    planned = make_plan(PlanRequest(teacher="t.pt", student="resnet8", default_method=main.default_method), DIGITS)
    assert planned.final.method.text == "hinton+crd"
    modreduce = make_plan(PlanRequest.from_user(teacher="t.pt", student="resnet8", recipe="modreduce",
                                                default_method="hinton+crd"), DIGITS)
    assert modreduce.final.method is None  # a scheme that takes no method gets none, not the default


def test_command_line_options_go_to_the_stages_that_take_them_and_one_no_stage_takes_is_refused():
    from recipes.distill_run import distill_request

    chain = make_plan(distill_request(teacher="t.pt", student="resnet8", chain="resnet20", dgkd=True,
                                      options={"drop_rate": 0.3}), DIGITS)
    assert [(s.scheme, s.options) for s in chain.stages] == [("offline", {}), ("dgkd", {"drop_rate": 0.3})]
    with pytest.raises(UserError, match="the offline scheme takes no option 'drop_rate'"):
        make_plan(distill_request(teacher="t.pt", student="resnet8", options={"drop_rate": 0.3}), DIGITS)
    cohort = make_plan(distill_request(student="resnet8", scheme="cohort", options={"peers": "resnet8,resnet20"}),
                       DIGITS)
    assert cohort.final.options == {"aggregator": "attention", "peers": "resnet8,resnet20"}  # the peers say N


def test_a_budget_kind_is_one_registered_class():
    import re

    from recipes import budget

    @budget.register_budget_kind
    class HalfParams(budget.CountBudget):  # a made-up kind: "Nhp" caps params at 2N
        name, metric, unit = "halfparams", "params", "M half-params"
        pattern = re.compile(rf"{budget._NUMBER}(?P<scale>[kmgt]?)hp")
        examples = ("50Khp",)
        help = "half-params (50Khp)"

        def ceiling(self, value, teacher_flops, text):
            return 2 * value

    try:
        parsed = budget.parse_budget("50K hp")
        assert (parsed.kind, parsed.metric, parsed.ceiling(None)) == ("halfparams", "params", 1e5)
        assert budget.cost_limits([parsed], None) == [("50K hp", "params", 1e5)]
        assert "half-params (50Khp)" in budget.budget_help() and "50Khp" in budget.accepted_forms()
    finally:
        del budget._KINDS["halfparams"]


def test_a_data_source_registers_its_form_and_protocol_in_its_own_module():
    from compressor.data import spec
    from recipes.protocols import default_train, protocol_name

    @spec.register_source("tiny-test", needs_dir=False, summary="a test source",
                          protocol=spec.Protocol("tiny", {"epochs": 3, "batch_size": 8}), rank=99)
    def build(directory, **kwargs):  # never opened here
        raise AssertionError

    try:
        assert "tiny-test" in spec.spec_forms() and spec.parse_spec("tiny-test").name == "tiny-test"
        assert protocol_name("tiny-test") == "tiny" and default_train("tiny-test", "resnet8")["epochs"] == 3
        assert protocol_name("nowhere:/x") == "imagefolder"  # a source without a protocol gets the fallback's
    finally:
        del spec._SOURCES["tiny-test"]
