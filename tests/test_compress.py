"""The main command: planner cases, bad inputs, the whole flow on digits, and resume."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from compressor.checkpoint import ModelMeta, load_model, save_model
from compressor.errors import UserError
from compressor.models import create
from recipes.api import plan_compression
from recipes.compress import compress
from tests.conftest import run_module_cli


@pytest.fixture(scope="module")
def cifar_teacher(tmp_path_factory) -> str:
    """An (untrained) CIFAR-100 resnet110 checkpoint: planning needs its shape and cost, not its accuracy."""
    path = tmp_path_factory.mktemp("cifar") / "resnet110.pt"
    save_model(path, create("resnet110", num_classes=100),
               ModelMeta("resnet110", 100, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, "cifar100:/nowhere"))
    return str(path)


@pytest.mark.parametrize(
    "budget, tas",
    [("0.1GFLOPs", 0), ("0.01GFLOPs", 1)],
)
def test_planner_on_cifar_resnet110(cache_dir, cifar_teacher, budget, tas):
    plan, _ = plan_compression(teacher=cifar_teacher, budgets=[budget], family="resnet_cifar", candidates="zoo")
    student = plan.final
    assert student.arch.startswith("resnet_d")
    fits = {c["name"]: c for c in plan.candidates}
    assert fits[student.arch]["fits"] and fits[student.arch]["flops"] <= float(budget[:-6]) * 1e9
    assert len(plan.stages) == 1 + tas
    assert plan.recipe == ("single" if tas == 0 else "takd")
    if tas:
        ta = plan.stages[0]
        assert fits[student.arch]["flops"] < fits[ta.arch]["flops"] < 255.3e6
        assert plan.final.teachers == ["ta1"]
    assert any("capacity gap" in r for r in plan.reasons)


def test_planner_prefers_teacher_family_and_largest_fit(cache_dir, cifar_teacher):
    plan, _ = plan_compression(teacher=cifar_teacher, budgets=["50MFLOPs"], candidates="zoo")
    chosen = next(c for c in plan.candidates if c["name"] == plan.final.arch)
    same_family = [c for c in plan.candidates if c["family"] == chosen["family"] and c["fits"]]
    assert chosen["family"] == "resnet_cifar"
    assert chosen["flops"] == max(c["flops"] for c in same_family)


def test_many_tas_give_dgkd(cache_dir, cifar_teacher):
    plan, _ = plan_compression(teacher=cifar_teacher, budgets=["0.01GFLOPs"], family="resnet_cifar", gap_threshold=2.5)
    assert plan.recipe == "dgkd" and len(plan.stages) >= 3
    assert plan.final.teachers == ["teacher"] + [s.name for s in plan.stages[:-1]]


@pytest.mark.parametrize(
    "budget, message",
    [
        ("10 parsecs", "accepted forms"),
        ("0.00001GFLOPs", "no student fits.*smallest candidate"),
        ("10GFLOPs", "already allows the teacher itself"),
    ],
)
def test_budget_errors(cache_dir, cifar_teacher, budget, message):
    with pytest.raises(UserError, match=message):
        plan_compression(teacher=cifar_teacher, budgets=[budget])


def test_latency_budget_is_timed(cache_dir, digits_teacher):
    plan, _ = plan_compression(teacher=digits_teacher, budgets=["1000ms"], family="resnet_cifar")
    timed = [c for c in plan.candidates if c.get("timed")]
    assert timed and all(c["latency_ms"] > 0 for c in timed)
    chosen = next(c for c in plan.candidates if c["name"] == plan.final.arch)
    assert chosen["timed"] and chosen["latency_ms"] <= 1000
    with pytest.raises(UserError, match="no student fits"):
        plan_compression(teacher=digits_teacher, budgets=["0.000001ms"], family="resnet_cifar")


def test_teacher_and_data_mismatch(cache_dir, cifar_teacher, tmp_path):
    with pytest.raises(UserError, match="predicts 100 classes but digits has 10"):
        plan_compression(teacher=cifar_teacher, budgets=["1MFLOPs"], data="digits")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        plan_compression(teacher=str(junk), budgets=["1MFLOPs"])


def test_whole_flow_on_digits_then_refuses_and_resumes(cache_dir, digits_teacher, tmp_path):
    out = tmp_path / "run"
    result = compress(digits_teacher, ["0.1MFLOPs"], out=out, epochs=1, int8=True, baseline=True, echo=lambda _: None)
    names = {p.name for p in out.iterdir()}
    assert {"student.pt", "student.onnx", "student.int8.onnx", "plan.yaml", "report.json", "report.md", "plots"} <= names
    assert {p.name for p in (out / "plots").iterdir()} >= {"candidates.png", "teacher_vs_student.png", "training_curves.png"}
    report = json.loads((out / "report.json").read_text())
    onnx_row = report["student"]["onnx"]
    assert onnx_row["max_abs_diff"] <= onnx_row["atol"] and onnx_row["top1_agreement"] == 1.0
    assert report["student"]["flops"] <= 0.1e6 < report["teacher"]["flops"]
    assert report["baseline"]["kd_gain"] == pytest.approx(report["student"]["test_top1"] - report["baseline"]["test_top1"])
    assert report["student"]["latency"]["onnx_ms"] > 0 and report["teacher"]["latency"]["torch_ms"] > 0
    onnx.checker.check_model(str(out / "student.onnx"))
    student = load_model(out / "student.pt")
    assert student.plan["stages"][-1]["arch"] == result.plan.final.arch
    # a second run into the same folder is refused, and nothing there changes
    before = (out / "report.json").read_bytes()
    with pytest.raises(UserError, match="holds another run"):
        compress(digits_teacher, ["0.1MFLOPs"], out=out, epochs=1, echo=lambda _: None)
    assert (out / "report.json").read_bytes() == before


class _Interrupt(Exception):
    pass


def test_resume_finishes_an_interrupted_run(cache_dir, digits_teacher, tmp_path):
    reference_out = tmp_path / "whole"
    compress(digits_teacher, ["0.2MFLOPs"], out=reference_out, epochs=2, echo=lambda _: None)
    reference = load_model(reference_out / "student.pt").model.state_dict()

    def die_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise _Interrupt  # the state of epoch 1 is on disk; the process "dies" here

    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        compress(digits_teacher, ["0.2MFLOPs"], out=out, epochs=2, echo=die_after_first_epoch)
    assert not (out / "student.pt").exists() and (out / "plan.yaml").exists()
    with pytest.raises(UserError, match="--resume"):
        compress(digits_teacher, ["0.2MFLOPs"], out=out, epochs=2, echo=lambda _: None)
    compress(out=out, resume=True, echo=lambda _: None)
    again = load_model(out / "student.pt").model.state_dict()
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_cli_bad_inputs_are_one_line_exit_2(cache_dir, digits_teacher, tmp_path):
    for args, message in [
        (["--teacher", digits_teacher, "--budget", "fast please"], "accepted forms"),
        (["--teacher", str(tmp_path / "missing.pt"), "--budget", "1MFLOPs"], "does not exist"),
        (["--teacher", digits_teacher, "--budget", "1MFLOPs", "--data", "cifar10:" + str(tmp_path)], "cifar"),
    ]:
        result = run_module_cli(*args, "--out", str(tmp_path / "o"))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_saved_plan_runs_as_a_preset(cache_dir, digits_teacher, tmp_path):
    plan, _ = plan_compression(teacher=digits_teacher, budgets=["0.5MFLOPs"], family="resnet_cifar")
    plan.save(tmp_path / "plan.yaml")
    # no --teacher on the command line: the plan names its own
    result = compress(preset=str(tmp_path / "plan.yaml"), out=tmp_path / "run", epochs=1, echo=lambda _: None)
    assert result.plan.final.arch == plan.final.arch and result.plan.final.train.epochs == 1
    assert (tmp_path / "run" / "student.onnx").exists() and result.report.teacher.arch == "resnet8"


def test_plan_and_dry_run_take_a_bundled_preset_and_the_teacher(cache_dir, cifar_teacher, cli):
    """`kdcompress plan --preset NAME` and the main command's --dry-run read a bundled preset by
    name, as `distill` and the main command do, and fill its blanks from --teacher."""
    from recipes.plan import Plan

    for argv in (["plan", "--preset", "cifar100_resnet110_resnet20", "--teacher", cifar_teacher],
                 ["--preset", "cifar100_resnet110_resnet20", "--teacher", cifar_teacher, "--dry-run"]):
        result = cli(*argv)
        assert result.exit_code == 0, result.output
        plan = Plan.from_yaml(result.output.split("--- plan.yaml ---", 1)[1])
        assert plan.teacher == cifar_teacher and plan.data == "cifar100:/nowhere"
        assert [s.arch for s in plan.stages] == ["resnet20"] and plan.final.train.epochs == 240
    result = cli("plan", "--preset", "cifar100_resnet110_resnet20", "--teacher", cifar_teacher, "--label-noise", "0.2")
    assert result.exit_code == 0, result.output
    assert Plan.from_yaml(result.output.split("--- plan.yaml ---", 1)[1]).corruption["label_noise"] == 0.2
    result = cli("plan", "--preset", "no_such_preset")
    assert result.exit_code == 2 and "unknown preset 'no_such_preset'" in result.output


def test_planned_modreduce_records_no_method_and_refuses_one(cache_dir, cifar_teacher):
    plan, _ = plan_compression(teacher=cifar_teacher, budgets=["0.1GFLOPs"], recipe="modreduce", family="resnet_cifar")
    assert plan.final.scheme == "modreduce" and plan.final.method is None
    assert plan.final.train.nesterov is True  # ModReduce App. A.3: SGD with Nesterov momentum 0.9
    with pytest.raises(UserError, match="modreduce.*--method"):
        plan_compression(teacher=cifar_teacher, budgets=["0.1GFLOPs"], recipe="modreduce", method="hinton",
                         family="resnet_cifar")
