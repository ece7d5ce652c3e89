"""The report's plots draw what the trainer records: the training-curve data of a real 1-epoch run."""

from __future__ import annotations

import pytest
import torch

from compressor.models import create
from compressor.schemes import Vanilla
from compressor.trainer import TrainConfig, fit, seed_everything
from recipes.report import curve_data, write_plots
from recipes.results import Report, StageFigures, StudentFigures


@pytest.fixture(scope="module")
def one_epoch_history():
    """The per-epoch records the trainer writes (the same as its JSONL log) for a 1-epoch digits run."""
    from compressor.data import load_source

    torch.set_num_threads(1)
    seed_everything(0)
    model = create("resnet_d8_w0.25", num_classes=10, in_chans=1)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.1, schedule="cosine", device="cpu", progress="off")
    return fit(Vanilla(model), load_source("digits", seed=0), config).history


def test_the_training_loss_panel_has_the_run_s_loss(one_epoch_history, tmp_path):
    # the plot read "train_loss", which the trainer never writes: the panel was empty on every run
    result = Report(StudentFigures("resnet_d8_w0.25"),
                    stages=[StageFigures("student", "resnet_d8_w0.25", "vanilla", [], "", history=one_epoch_history)])
    panels = curve_data(result)
    record = one_epoch_history[0]
    assert panels["training loss"] == {"student": ([1], [pytest.approx(record["loss"])])}
    assert panels["validation top-1 (%)"] == {"student": ([1], [pytest.approx(record["val_top1"])])}
    assert "training_curves.png" in {p.split("/")[-1] for p in write_plots(result, tmp_path).values()}


def test_epochs_without_a_value_are_left_out_not_drawn_as_nan():
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": float("nan"), "val_top1": 50.0},
               {"epoch": 3, "loss": 1.0}]
    panels = curve_data(Report(StudentFigures("resnet8"), stages=[
        StageFigures("ta1", "resnet8", "offline", [], "", history=history),
        StageFigures("student", "resnet8", "offline", [], "", history=[])]))
    assert panels == {"training loss": {"ta1": ([1, 3], [2.0, 1.0])}, "validation top-1 (%)": {"ta1": ([2], [50.0])}}
