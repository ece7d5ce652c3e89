"""The learning guard: a run at chance, or whose loss never fell, stops with one line instead of shipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compressor.checkpoint import ModelMeta, load_model, save_model
from compressor.errors import UserError
from compressor.models import create
from compressor.schemes import Vanilla
from compressor.trainer import NotLearning, TrainConfig, fit, seed_everything
from compressor.trainer import learning_guard
from compressor.trainer.learning_guard import not_learning_reason


def rec(epoch: int, val: float | None, loss: float, ce: float | None = None, train: float | None = None) -> dict:
    terms = {"ce": ce} if ce is not None else {"other": loss}
    return {"epoch": epoch, "val_top1": val, "train_top1": train, "loss": loss, "loss_terms": terms}


def test_at_chance_from_the_second_epoch_names_the_accuracy_and_the_loss_trend():
    history = [rec(1, 10.0, 27.9, 2.31), rec(2, 11.5, 27.8, 2.30)]
    reason = not_learning_reason(history, num_classes=10, epochs=8)
    assert reason is not None and "validation top-1 11.50% is at chance (10.0% for 10 classes)" in reason
    assert "27.9 -> 27.8" in reason


def test_one_slow_first_epoch_is_not_yet_a_dead_run_but_a_one_epoch_run_at_chance_is():
    assert not_learning_reason([rec(1, 10.0, 2.3, 2.3)], num_classes=10, epochs=8) is None
    assert "at chance" in not_learning_reason([rec(1, 10.0, 2.3, 2.3)], num_classes=10, epochs=1)


def test_the_threshold_is_1_2_times_chance():
    # 100 classes: chance 1%, so 1.2% is at chance and 1.3% is not
    assert not_learning_reason([rec(1, 1.0, 4.6, 4.6), rec(2, 1.2, 4.5, 4.5)], 100, 240) is not None
    assert not_learning_reason([rec(1, 1.0, 4.6, 4.6), rec(2, 1.3, 4.5, 4.5)], 100, 240) is None


def test_mid_run_a_model_at_chance_whose_loss_falls_is_judged_at_its_end():
    # the teacher-class network regresses features first: at chance while its loss falls 10x
    history = [rec(1, 10.0, 0.08), rec(2, 10.4, 0.008)]
    assert not_learning_reason(history, 10, 5) is None
    assert "at chance" in not_learning_reason(history, 10, 2)


def test_mid_run_a_feature_term_that_falls_while_the_ce_is_flat_is_judged_at_its_end():
    # AT at weight 1000 on digits: at chance, CE flat for two epochs, the whole loss falling; 85% later
    history = [{"epoch": 1, "val_top1": 10.4, "loss": 32.18, "loss_terms": {"ce": 2.30, "at": 29.88}},
               {"epoch": 2, "val_top1": 11.1, "loss": 13.52, "loss_terms": {"ce": 2.29, "at": 11.23}}]
    assert not_learning_reason(history, 10, 15) is None


def test_the_best_epoch_counts_and_train_accuracy_stands_in_without_validation():
    assert not_learning_reason([rec(1, 40.0, 2.0, 2.0), rec(2, 10.0, 1.9, 1.9)], 10, 5) is None
    reason = not_learning_reason([rec(1, None, 2.3, 2.3, train=9.0), rec(2, None, 2.3, 2.3, train=10.5)], 10, 5)
    assert reason is not None and "training top-1 10.50%" in reason


def test_a_cross_entropy_that_never_fell_stops_at_the_end_even_above_chance():
    history = [rec(1, 30.0, 2.0, 1.50), rec(2, 31.0, 2.1, 1.52), rec(3, 30.5, 2.2, 1.49)]
    assert not_learning_reason(history, 10, 3) is not None  # 1.49 > 0.99 * 1.50
    assert not_learning_reason(history[:2], 10, 3) is None  # judged at the end only


def test_knowledge_terms_may_rise_when_the_cross_entropy_falls():
    # DKD-style weight warm-up: the total rises while CE falls; the CE is what is judged
    history = [rec(1, 50.0, 1.0, 0.9), rec(2, 60.0, 1.5, 0.6), rec(3, 70.0, 2.0, 0.5)]
    assert not_learning_reason(history, 10, 3) is None


class DeadNet(nn.Module):
    """Every hidden ReLU off (bias -100): no gradient reaches the features, one class always wins."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 16)
        self.classifier = nn.Linear(16, 10)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.bias.fill_(-100.0)
            self.classifier.weight.zero_()
            self.classifier.bias.copy_(torch.arange(10, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(x.flatten(1))))


@pytest.fixture(scope="module")
def digits():
    from compressor.data import load_source

    return load_source("digits", seed=0)


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, lr=0.01, schedule="cosine", momentum=0.0, weight_decay=0.0,
                device="cpu", progress="off")
    base.update(kw)
    return TrainConfig(**base)


def test_a_dead_network_stops_after_its_second_epoch(digits):
    seed_everything(0)
    with pytest.raises(NotLearning) as info:
        fit(Vanilla(DeadNet()), digits, config(epochs=5))
    assert info.value.epoch == 2 and "at chance" in str(info.value)


def test_the_guard_can_be_turned_off_for_failure_studies(digits):
    seed_everything(0)
    result = fit(Vanilla(DeadNet()), digits, config(epochs=2, stop_when_not_learning=False))
    assert result.best_record["val_top1"] <= 12.0


def test_a_chain_stops_at_the_stage_that_does_not_learn_and_keeps_the_finished_one(digits, tmp_path, monkeypatch):
    from recipes.plan import TEACHER, Plan, Stage
    from recipes.runner import run_plan

    teacher_path = tmp_path / "t.pt"
    save_model(teacher_path, create("resnet8", num_classes=10, in_chans=1),
               ModelMeta("resnet8", 10, 1, (8, 8), digits.mean, digits.std, "digits"))
    train = dict(epochs=2, batch_size=64, lr=0.05, schedule="cosine", progress="off", device="cpu")
    plan = Plan(data="digits", teacher=str(teacher_path), teacher_arch="resnet8", recipe="takd", stages=[
        Stage("ta1", "offline", "resnet8", [TEACHER], "hinton", {}, {**train, "stop_when_not_learning": False}, "ta"),
        Stage("student", "offline", "resnet_d8_w0.5", ["ta1"], "hinton", {}, dict(train), "student"),
    ])
    monkeypatch.setattr(learning_guard, "CHANCE_FACTOR", 1000.0)  # every accuracy counts as chance
    with pytest.raises(UserError) as info:
        run_plan(plan, digits, tmp_path / "run", teacher=load_model(teacher_path), echo=lambda _: None)
    message = str(info.value)
    assert "\n" not in message
    assert "stage 'student' (resnet_d8_w0.5 via offline, method hinton) stopped" in message
    assert "stage(s) ta1 finished and are kept" in message and f"resuming the run in {tmp_path / 'run'} after the fix" in message
    assert (tmp_path / "run" / "stages" / "ta1" / "model.pt").is_file()
    assert not (tmp_path / "run" / "stages" / "student" / "state.pt").exists()  # a dead state is not resumed
