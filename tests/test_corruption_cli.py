"""--label-noise / --imbalance / --imbalance-gamma on train, distill and the main command; the
teacher-vs-data warnings (class names, corruptions)."""

from __future__ import annotations

import re

import pytest
import yaml

from compressor.checkpoint import load_model, save_model
from compressor.data import load_source
from compressor.data.corruptions import Corruption
from compressor.data.splits import round_half_up
from compressor.errors import UserError
from compressor.trainer.evaluate import class_names_warning
from recipes.context import resolve_inputs


@pytest.fixture(scope="module")
def noisy_teacher(tmp_path_factory):
    """resnet8 trained 1 epoch on digits with 40% label noise, through the CLI."""
    from click.testing import CliRunner

    from recipes.cli import cli as root

    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    result = CliRunner().invoke(root, ["train", "--arch", "resnet8", "--data", "digits", "--epochs", "1",
                                       "--label-noise", "0.4", "-o", str(path), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def test_train_label_noise_reaches_the_source_and_the_checkpoint(noisy_teacher):
    options = load_model(noisy_teacher).extra["data"]["options"]
    assert (options["label_noise"], options["imbalance"], options["seed"]) == (0.4, 1.0, 0)
    # the recorded options rebuild the labels it trained on: exactly round(0.4 n) of them moved
    src = load_source("digits", seed=options["seed"], **Corruption.from_dict(options).to_dict())
    n = src.split_size("train")
    assert n == 1294 and int((src.targets("train") != src.clean_train_labels).sum()) == round_half_up(0.4 * n) == 518


def test_distill_records_its_corruption_and_notes_the_teachers(cli, noisy_teacher, tmp_path):
    out = tmp_path / "s.pt"
    result = cli("distill", "--teacher", str(noisy_teacher), "--student", "resnet8", "--epochs", "1",
                 "--imbalance", "2", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert ("note: the teacher was trained on label noise 0.4 at seed 0 but this run uses imbalance 2 (exponential) "
            "at seed 0: to train on the teacher's labels give its --label-noise/--imbalance/--imbalance-gamma "
            "and --seed") in result.output
    plan = yaml.safe_load((tmp_path / "s.pt.run" / "plan.yaml").read_text())
    assert plan["corruption"] == {"label_noise": 0.0, "imbalance": 2.0, "imbalance_gamma": None}
    student = load_model(out)
    assert student.extra["data"]["options"]["imbalance"] == 2.0 and student.plan["corruption"]["imbalance"] == 2.0


def test_same_corruption_as_the_teacher_gives_no_note(noisy_teacher):
    inputs = resolve_inputs(str(noisy_teacher), None, corruption=Corruption.create(label_noise=0.4))
    assert inputs.notes == [] and inputs.source.options.label_noise == 0.4
    other_seed = resolve_inputs(str(noisy_teacher), None, seed=1, corruption=Corruption.create(label_noise=0.4))
    assert other_seed.notes == ["note: the teacher was trained on label noise 0.4 at seed 0 but this run uses label "
                                "noise 0.4 at seed 1: to train on the teacher's labels give its "
                                "--label-noise/--imbalance/--imbalance-gamma and --seed"]


def test_main_command_plan_records_the_corruption(cli, noisy_teacher, tmp_path):
    result = cli("--teacher", str(noisy_teacher), "--budget", "2x", "--dry-run", "--label-noise", "0.4")
    assert result.exit_code == 0, result.output
    assert "every stage trains on corrupted labels: label noise 0.4 at seed 0 (val and test stay clean)" in result.output
    assert "corruption: {label_noise: 0.4, imbalance: 1.0, imbalance_gamma: null}" in result.output
    assert "note: the teacher" not in result.output
    result = cli("plan", "--teacher", str(noisy_teacher), "--budget", "2x", "--imbalance-gamma", "0.6")
    assert result.exit_code == 0, result.output
    assert "imbalance 20 (power law, gamma 0.6) at seed 0" in result.output


def test_resume_refuses_other_corruptions(tmp_path):
    from recipes.compress import compress
    from recipes.plan import Plan, Stage

    plan = Plan(data="digits", stages=[Stage("student", "vanilla", "resnet8")], recipe="vanilla",
                corruption=Corruption.create(label_noise=0.4).to_dict())
    plan.save(tmp_path / "plan.yaml")
    with pytest.raises(UserError, match=r"trains on label noise 0.4, not label noise 0.2: drop --label-noise"):
        compress(out=tmp_path, resume=True, corruption=Corruption.create(label_noise=0.2), echo=lambda line: None)


@pytest.mark.parametrize("flags, message", [
    (["--label-noise", "1"], r"label noise rate 1.0 is outside \[0, 1\)"),
    (["--label-noise", "-0.1"], "label noise rate -0.1 is outside"),
    (["--imbalance", "0.5"], "imbalance 0.5 is invalid"),
    (["--imbalance", "inf"], "imbalance inf is invalid"),
    (["--imbalance-gamma", "0"], "imbalance_gamma 0.0 is invalid"),
    (["--imbalance", "1", "--imbalance-gamma", "1"], "imbalance_gamma needs imbalance > 1"),
])
@pytest.mark.parametrize("command", [
    ["train", "--arch", "resnet8", "-o", "{tmp}/t.pt"],
    ["distill", "--student", "resnet8", "--cohort", "2", "-o", "{tmp}/s.pt"],
    ["--budget", "2MFLOPs", "--out", "{tmp}/run"],
    ["plan", "--budget", "2MFLOPs"],
])
def test_bad_corruption_values_exit_2_and_write_nothing(cli, tmp_path, command, flags, message):
    result = cli(*[a.format(tmp=tmp_path) for a in command], *flags)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert re.search(message, result.output)
    assert list(tmp_path.iterdir()) == []


def test_class_names_warning_is_one_hand_checked_line():
    assert class_names_warning("t.pt", ["0", "1", "2"], "digits", ["0", "1", "2"]) is None
    assert class_names_warning("t.pt", None, "digits", ["0", "1", "2"]) is None  # foreign file: nothing recorded
    assert class_names_warning("t.pt", ["a", "1", "c"], "digits", ["0", "1", "2"]) == (
        "warning: t.pt's class names differ from digits's in 2 of 3 classes (class 0: 'a' vs '0'); "
        "its outputs may stand for other classes")


def test_teacher_with_other_class_names_gets_a_warning_not_an_error(cli, noisy_teacher, tmp_path):
    loaded = load_model(noisy_teacher)
    loaded.meta.class_names = ["zero", *loaded.meta.class_names[1:]]
    renamed = tmp_path / "renamed.pt"
    save_model(renamed, loaded.model, loaded.meta, metrics=loaded.metrics, extra=loaded.extra)
    inputs = resolve_inputs(str(renamed), "digits", corruption=Corruption.create(label_noise=0.4))
    assert inputs.notes == ["warning: the teacher's class names differ from digits's in 1 of 10 classes "
                            "(class 0: 'zero' vs '0'); its outputs may stand for other classes"]
    result = cli("eval", str(renamed))
    assert result.exit_code == 0
    assert f"warning: {renamed}'s class names differ from digits's in 1 of 10 classes" in result.output
