"""TA chains through `distill`: three stages, killed in the second, resumed exactly; chain errors."""

from __future__ import annotations

import pytest
import torch

from compressor.checkpoint import load_model
from compressor.errors import UserError
from recipes.distill_run import distill
from tests.conftest import run_module_cli

CHAIN = ["resnet_d14_w1", "resnet8"]  # 1x8x8 digits: 1.8 and 1.2 MFLOPs, between teacher and student
STUDENT = "resnet_d8_w0.5"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from recipes.training import train_vanilla

    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    train_vanilla("resnet20", "digits", path, epochs=1, progress="off")
    return str(path)


class _Killed(Exception):
    pass


def _run(teacher: str, output, echo, resume: bool = False) -> list[str]:
    return distill(teacher=teacher, student=STUDENT, chain=CHAIN, method="hinton", output=output,
                   train={"epochs": 2}, resume=resume, echo=echo)


def test_three_stage_chain_resumes_in_its_second_stage(teacher, tmp_path):
    whole = tmp_path / "whole.pt"
    lines = _run(teacher, whole, echo=lambda _: None)
    # every stage's accuracy is recorded and reported
    for stage in ("ta1", "ta2", "student"):
        model = load_model(tmp_path / "whole.pt.run" / "stages" / stage / "model.pt")
        assert model.metrics["test_top1"] > 10.0 and model.extra["stage"] == stage
    assert [line.split()[0] for line in lines[1:4]] == ["ta1", "ta2", "student"]
    reference = load_model(whole).model.state_dict()

    seen: list[str] = []

    def die_in_stage_two(line: str) -> None:
        seen.append(line)
        if any(s.startswith("stage 2 of 3") for s in seen) and line.startswith("epoch 1/2"):
            raise _Killed

    out = tmp_path / "cut.pt"
    with pytest.raises(_Killed):
        _run(teacher, out, echo=die_in_stage_two)
    stages = tmp_path / "cut.pt.run" / "stages"
    assert (stages / "ta1" / "model.pt").exists() and not (stages / "ta2" / "model.pt").exists()
    assert torch.load(stages / "ta2" / "state.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(UserError, match="--resume"):
        _run(teacher, out, echo=lambda _: None)
    resumed: list[str] = []
    _run(teacher, out, echo=resumed.append, resume=True)
    assert any("ta1" in line and "already trained" in line for line in resumed)
    again = load_model(out).model.state_dict()
    assert all(torch.equal(reference[k], again[k]) for k in reference)


@pytest.mark.parametrize(
    "chain, message",
    [
        ("resnet110", "not smaller than the teacher"),
        ("resnet_d8_w0.25", "not larger than the student"),
        ("resnet8,resnet_d14_w1", "not smaller than resnet8"),
        ("", "needs one or more"),
    ],
)
def test_bad_chains_are_one_line_exit_2(teacher, tmp_path, chain, message):
    result = run_module_cli("distill", "--teacher", teacher, "--chain", chain, "--student", STUDENT,
                            "-o", str(tmp_path / "s.pt"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.pt.run").exists()
