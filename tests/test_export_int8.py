"""export/ int8: static QDQ quantization calibrated on digits keeps accuracy; losses are flagged."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn as nn

from _export_models import FAST, SmallNet, leftovers, make_checkpoint, registered, seeded
from compressor.errors import UserError
from export.metadata import ExportMetadata, read_metadata
from export.pipeline import export_model, quantize_model
from export.quantize import Int8Comparison, equal_batches

__all__ = ["registered"]


@pytest.fixture(scope="module")
def digits_model():
    """A CNN trained on digits for a few epochs (plain SGD, seconds on CPU), and its data source."""
    from compressor.data import load_source

    source = load_source("digits", seed=0)
    torch.manual_seed(0)
    model = SmallNet(num_classes=10, in_chans=1, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(5):
        for batch in source.loader("train", 64, shuffle=True, augment=False, epoch=epoch):
            loss = nn.functional.cross_entropy(model(batch.x), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), source


def test_int8_on_digits_keeps_accuracy_within_the_margin(tmp_path, digits_model):
    model, source = digits_model
    fp32, int8 = tmp_path / "d.onnx", tmp_path / "d.int8.onnx"
    export_model(model, fp32, inputs=source.sample("test", 32, seed=0).x, inputs_from_data=True, exporter=FAST,
                 metadata=ExportMetadata(mean=list(source.mean), std=list(source.std)), measure_cost=False)
    calibration = source.sample("train", 300, seed=0).x
    comparison = quantize_model(fp32, int8, [calibration], source.loader("test", 256, shuffle=False, augment=False))
    assert comparison.fp32_accuracy > 85.0  # the model learned something, so the comparison means something
    assert comparison.drop <= 1.0 and not comparison.flagged
    assert comparison.test_samples == source.split_size("test") and comparison.calibration_samples == 300
    assert comparison.int8_bytes < comparison.fp32_bytes == fp32.stat().st_size
    proto = onnx.load(str(int8))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    per_channel = [n for n in proto.graph.node
                   if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # per-channel weight scales carry an axis
    meta = read_metadata(int8)
    assert "QDQ" in meta.quantization and "per-channel" in meta.quantization and meta.mean == list(source.mean)
    assert leftovers(tmp_path) == []


def test_int8_loss_beyond_the_margin_is_flagged_loudly():
    figures = dict(agreement=90.0, test_samples=100, fp32_bytes=4000, int8_bytes=1000, calibration_samples=300,
                   settings="int8")
    ok = Int8Comparison(fp32_accuracy=90.0, int8_accuracy=89.5, margin=1.0, **figures)
    bad = Int8Comparison(fp32_accuracy=90.0, int8_accuracy=88.0, margin=1.0, **figures)
    assert not ok.flagged and bad.flagged and bad.drop == pytest.approx(2.0)
    assert not any("WARNING" in line for line in ok.summary_lines())
    assert any("WARNING" in line and "2.00" in line for line in bad.summary_lines())
    assert bad.to_dict()["flagged"] is True


def test_calibration_batches_are_equal_and_keep_every_sample():
    batches = equal_batches([torch.zeros(32, 1, 4, 4), torch.zeros(32, 1, 4, 4), torch.zeros(12, 1, 4, 4)])
    assert sum(len(b) for b in batches) == 76 and len({len(b) for b in batches}) == 1


def test_int8_without_calibration_data_is_a_clear_error(tmp_path):
    fp32 = tmp_path / "m.onnx"
    export_model(seeded(SmallNet()), fp32, input_shape=(3, 16, 16), exporter=FAST, measure_cost=False)
    with pytest.raises(UserError, match="calibration"):
        quantize_model(fp32, tmp_path / "q.onnx", [], [])
    assert not (tmp_path / "q.onnx").exists()


def test_cli_export_int8_on_digits(cli, tmp_path, registered, digits_model):
    from compressor.checkpoint import ModelMeta, save_model

    name = registered("exporttest_digitsnet", SmallNet)
    model, source = digits_model
    ckpt = tmp_path / "digits.pt"
    save_model(ckpt, model, ModelMeta.from_source(name, source, width=16))
    result = cli("export", str(ckpt), "-o", str(tmp_path / "student.onnx"), "--int8", "--data", "digits",
                 "--exporter", FAST, "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "32 data inputs" in result.output and "int8" in result.output and "WARNING" not in result.output
    int8 = json.loads((tmp_path / "r.json").read_text())["int8"]
    assert int8["drop"] <= 1.0 and int8["flagged"] is False and int8["calibration_samples"] == 300
    assert (tmp_path / "student.int8.onnx").exists()
    assert read_metadata(tmp_path / "student.int8.onnx").dataset == "digits"


def test_cli_int8_without_data_fails_before_writing(cli, tmp_path, registered):
    name = registered("exporttest_smallnet", SmallNet)
    ckpt = make_checkpoint(tmp_path, name, seeded(SmallNet()))
    result = cli("export", str(ckpt), "-o", str(tmp_path / "s.onnx"), "--int8")
    assert result.exit_code == 2 and "--int8 needs calibration" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists() and not (tmp_path / "s.int8.onnx").exists()
