"""Issue 14: the pruned teacher as a student candidate (--candidates zoo|pruned|all), planned and run."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.checkpoint import load_model
from compressor.cost import measure
from recipes.api import plan_compression


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    """resnet20 after one epoch on digits: a real teacher file with the data's shape and normalisation."""
    from recipes.training import train_vanilla

    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    train_vanilla("resnet20", "digits", path, epochs=1, progress="off")
    return str(path)


def _half(teacher: str) -> tuple[str, float]:
    loaded = load_model(teacher)
    flops = measure(loaded.model, loaded.meta.input_shape).flops
    return f"{flops / 2e6:.4f}MFLOPs", flops / 2


def test_pruned_only_plans_one_offline_stage_from_the_teacher(cache_dir, digits_teacher):
    budget, limit = _half(digits_teacher)
    plan, _ = plan_compression(teacher=digits_teacher, budgets=[budget], candidates="pruned")
    (stage,) = plan.stages
    assert (stage.arch, stage.scheme, stage.teachers, plan.recipe) == ("resnet20", "offline", ["teacher"], "pruned")
    record = stage.options["prune"]
    assert record["history"] and record["importance"] == "l1" and record["round_to"] == 8
    (listed,) = plan.candidates
    assert listed["name"] == "resnet20-pruned" and listed["fits"] and 0 < listed["flops"] <= limit
    assert any("pruned candidate resnet20-pruned" in r for r in plan.reasons)


def test_all_lists_the_pruned_teacher_beside_the_zoo_and_the_rule_prefers_it_when_it_fits(cache_dir, digits_teacher):
    budget, _ = _half(digits_teacher)
    plan, _ = plan_compression(teacher=digits_teacher, budgets=[budget], candidates="all")
    names = [c["name"] for c in plan.candidates]
    assert "resnet20-pruned" in names and len(names) > 1
    pruned = next(c for c in plan.candidates if c["name"] == "resnet20-pruned")
    assert pruned["family"] == "resnet_cifar" and pruned["fits"]
    fitting = [c for c in plan.candidates if c["fits"] and c["family"] == pruned["family"]]
    largest = max(fitting, key=lambda c: (c["flops"], -c["params"]))
    assert plan.final.options.get("prune") is not None  # chosen although the zoo has a larger fitting member
    if largest["name"] != "resnet20-pruned":  # the reason says the zoo's larger pick was passed over
        assert any(f"preferred over the zoo's pick ({largest['name']}" in r for r in plan.reasons), plan.reasons
    default, _ = plan_compression(teacher=digits_teacher, budgets=[budget])  # --candidates all is the default
    assert default.final.options.get("prune") is not None
    zoo_only, _ = plan_compression(teacher=digits_teacher, budgets=[budget], candidates="zoo")
    assert "resnet20-pruned" not in [c["name"] for c in zoo_only.candidates]


def test_a_recipe_that_does_not_apply_to_a_pruned_teacher_leaves_it_out_under_all(cache_dir, digits_teacher):
    budget, _ = _half(digits_teacher)
    plan, _ = plan_compression(teacher=digits_teacher, budgets=[budget], recipe="modreduce")
    assert plan.final.options.get("prune") is None and plan.final.scheme == "modreduce"
    assert any("--recipe modreduce does not apply to a pruned teacher" in r for r in plan.reasons)


def test_an_unreachable_budget_falls_back_to_the_zoo_and_says_why(cache_dir, digits_teacher):
    plan, _ = plan_compression(teacher=digits_teacher, budgets=["0.2MFLOPs"], candidates="all")  # floor 0.31 M
    assert "resnet20-pruned" not in [c["name"] for c in plan.candidates]
    assert any("no pruned candidate (pruning resnet20 cannot reach" in r and "falling back to the zoo" in r
               for r in plan.reasons)
    assert plan.final.options.get("prune") is None


def test_cli_flag_and_a_pruned_run_that_exports_and_reloads(cache_dir, digits_teacher, tmp_path, cli):
    from recipes.compress import compress

    budget, limit = _half(digits_teacher)
    shown = cli("plan", "--teacher", digits_teacher, "--budget", budget, "--candidates", "pruned")
    assert shown.exit_code == 0 and "resnet20-pruned" in shown.output
    assert cli("plan", "--teacher", digits_teacher, "--budget", budget, "--candidates", "x").exit_code == 2

    out = tmp_path / "run"
    compress(digits_teacher, [budget], out=out, epochs=1, candidates="pruned", echo=lambda _: None)
    raw = torch.load(out / "student.pt", weights_only=True)  # no pickled module anywhere
    assert raw["meta"]["arch"] == "resnet20" and raw["meta"]["pruning"]["history"]
    student = load_model(out / "student.pt")
    assert measure(student.model, student.meta.input_shape).flops <= limit
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["flops"] <= limit < report["teacher"]["flops"]
    assert report["student"]["onnx"]["max_abs_diff"] <= report["student"]["onnx"]["atol"]
    assert report["student"]["latency"]["onnx_ms"] > 0 and report["teacher"]["latency"]["torch_ms"] > 0
    pruning = report["student"]["pruning"]
    assert pruning["importance"] == "l1" and 0 < pruning["ratio"] < 1 and pruning["torch_speedup_vs_teacher"] > 0
    assert 0 <= pruning["val_top1_before_recovery"] <= 100 and pruning["val_top1_after_recovery"] is not None
    assert report["student"]["search_name"] == "resnet20-pruned"
    markdown = (out / "report.md").read_text()
    assert "## Pruned teacher" in markdown and "| resnet20-pruned | resnet_cifar |" in markdown
    assert "**chosen**" in next(line for line in markdown.splitlines() if line.startswith("| resnet20-pruned"))


def test_the_pruned_student_starts_from_the_teachers_kept_weights(cache_dir, digits_teacher):
    from recipes.probe import _pruned_start

    budget, _ = _half(digits_teacher)
    plan, inputs = plan_compression(teacher=digits_teacher, budgets=[budget], candidates="pruned")
    (candidate,) = plan.candidates
    student = _pruned_start(inputs, candidate)["student_init"]  # what the probe and the stage train
    assert measure(student, inputs.input_shape).flops == candidate["flops"]
    teacher_rows = inputs.teacher.model.conv1.weight.detach().flatten(1)
    kept = student.conv1.weight.detach().flatten(1)
    assert kept.shape[0] < teacher_rows.shape[0]
    assert all(any(torch.equal(row, t) for t in teacher_rows) for row in kept)  # rows copied, not re-initialised


class _Interrupt(Exception):
    pass


def test_an_interrupted_pruned_run_resumes_to_the_same_student(cache_dir, digits_teacher, tmp_path):
    from recipes.compress import compress

    budget, _ = _half(digits_teacher)
    reference_out = tmp_path / "whole"
    compress(digits_teacher, [budget], out=reference_out, epochs=2, candidates="pruned", echo=lambda _: None)
    reference = load_model(reference_out / "student.pt").model.state_dict()

    def die_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise _Interrupt  # the pruned student's epoch-1 state is on disk

    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        compress(digits_teacher, [budget], out=out, epochs=2, candidates="pruned", echo=die_after_first_epoch)
    compress(out=out, resume=True, echo=lambda _: None)  # the plan.yaml carries the pruning history
    again = load_model(out / "student.pt").model.state_dict()
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)


def test_a_teacher_that_is_no_zoo_architecture_gives_no_pruned_candidate():
    from compressor.checkpoint import LoadedModel, ModelMeta
    from compressor.models import create
    from recipes.budget import parse_budget
    from recipes.pruned import pruned_candidate

    teacher = LoadedModel(create("resnet8", num_classes=10), ModelMeta("module:MyNet", 10))
    candidate, why = pruned_candidate(teacher, [parse_budget("1MFLOPs")], (3, 32, 32))
    assert candidate is None and "module:MyNet, not a zoo architecture" in why and "zoo candidates compete alone" in why


def test_a_latency_budget_is_solved_with_the_timer_and_the_candidate_keeps_its_timing():
    from compressor.checkpoint import LoadedModel, ModelMeta
    from compressor.models import create
    from recipes.budget import parse_budget
    from recipes.pruned import pruned_candidate

    torch.manual_seed(0)
    teacher = LoadedModel(create("resnet20", num_classes=10), ModelMeta("resnet20", 10))
    shape = (3, 32, 32)
    calls = []

    def fake_timer(model) -> float:  # a deterministic stand-in for onnxruntime: 1 ms per 10 MFLOPs
        calls.append(model)
        return measure(model, shape).flops / 1e7

    candidate, why = pruned_candidate(teacher, [parse_budget("2ms")], shape, None, fake_timer)
    assert candidate is not None and candidate.timed and candidate.latency_ms <= 2.0
    assert candidate.latency_ms == pytest.approx(candidate.flops / 1e7) and len(calls) >= 2
    none, why = pruned_candidate(teacher, [parse_budget("0.01ms")], shape, None, fake_timer)
    assert none is None and "cannot reach 0.01 ms at batch 1" in why and "falling back to the zoo" in why


def test_the_probe_search_trains_the_pruned_teacher_beside_the_zoo(cache_dir, digits_teacher):
    from recipes.probe import probe_search

    budget, _ = _half(digits_teacher)
    plan, inputs = plan_compression(teacher=digits_teacher, budgets=[budget], candidates="all", load_data=True,
                                    family="resnet_cifar")
    fitting = sorted((c for c in plan.candidates if c["fits"]), key=lambda c: -c["flops"])
    k = 1 + next(i for i, c in enumerate(fitting) if c["name"] == "resnet20-pruned")  # the top-k reach it
    assert k <= 3, [c["name"] for c in fitting]  # keeps the probe short
    winner, rows = probe_search(plan, inputs, k=k, device="cpu", echo=lambda _: None)
    scored = {r["name"]: r["score"] for r in rows if r["round"] == 1}
    assert scored.get("resnet20-pruned") is not None and winner in scored
