"""export/ int8: static QDQ quantization calibrated on digits keeps accuracy; losses are flagged."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn as nn

from _export_models import FAST, SmallNet, digits_net, leftovers, make_checkpoint, registered, seeded
from compressor.errors import UserError
from export.metadata import ExportMetadata, read_metadata
from export.pipeline import export_model, quantize_model
from export.quantize import Int8Comparison, equal_batches

__all__ = ["registered"]


@pytest.fixture(scope="module")
def digits_model():
    """A CNN trained on digits for a few epochs (plain SGD, seconds on CPU), and its data source."""
    return digits_net(5)


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


# accuracy control ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sensitive_digits_model():
    """A digits CNN whose second convolution int8 cannot represent: input channel 0 of that conv is
    dead (its BatchNorm scale 0, shift -1, so the ReLU always outputs 0) and every output channel
    weighs it by 1000. The float model ignores those weights (they multiply zeros; no gradient moves
    them), but per-channel int8 scales are set by them (1000 / 63), so the conv's real weights round
    to 0 and the int8 model predicts one class. Leaving that one conv float repairs it."""

    def break_channel(model: nn.Module) -> None:
        with torch.no_grad():
            model.features[1].weight[0], model.features[1].bias[0] = 0.0, -1.0
            model.features[3].weight[:, 0] = 1000.0

    model, source = digits_net(5, break_channel)
    assert float(model.features[3].weight[:, 0].detach().min()) == 1000.0  # still there after training
    return model, source


def _export_sensitive(tmp_path, sensitive_digits_model):
    model, source = sensitive_digits_model
    fp32 = tmp_path / "s.onnx"
    export_model(model, fp32, inputs=source.sample("test", 32, seed=0).x, inputs_from_data=True, exporter=FAST,
                 metadata=ExportMetadata(mean=list(source.mean), std=list(source.std)), measure_cost=False, log=None)
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    return fp32, convs[1], source


def _quantize_controlled(fp32, out, source, **kwargs):
    return quantize_model(fp32, out, [source.sample("train", 300, seed=0).x],
                          source.loader("test", 256, shuffle=False, augment=False),
                          val_batches=source.loader("val", 256, shuffle=False, augment=False), log=None, **kwargs)


def _optimized_op(path, node_name: str) -> str:
    """The op onnxruntime runs for ``node_name`` after its graph optimisations (QLinearConv = int8)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path) + ".optimized"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return next(n.op_type for n in optimized.graph.node if n.name == node_name)


def test_accuracy_control_leaves_the_sensitive_layer_float_first(tmp_path, sensitive_digits_model):
    fp32, sensitive, source = _export_sensitive(tmp_path, sensitive_digits_model)
    int8 = tmp_path / "s.int8.onnx"
    comparison = _quantize_controlled(fp32, int8, source, margin=1.0)
    control = comparison.control
    assert control.fp32_val_accuracy > 85.0 and control.val_samples == source.split_size("val")
    assert control.full_int8_val_accuracy < 30.0  # all-int8 is broken, as built
    assert control.ranking[0].name == sensitive and control.ranking[0].sensitivity > 0
    assert control.float_layers == [sensitive] and control.steps[-1].float_layers == 1
    assert control.met_margin and control.drop <= 1.0 and comparison.written and int8.exists()
    assert control.layers >= 3 and control.latency["fp32_ms"] > 0 and control.latency["int8_ms"] > 0
    assert comparison.drop <= 2.0  # the test split agrees (359 images; reported, not used to choose)
    # the file really runs that conv in float: onnxruntime does not fuse it back into an int8 kernel
    assert _optimized_op(int8, sensitive) in ("Conv", "FusedConv")
    first = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"][0]
    assert _optimized_op(int8, first) == "QLinearConv"
    meta = read_metadata(int8)
    assert meta.extra["float_layers"] == [sensitive] and "1 layer(s) left float" in meta.quantization
    lines = "\n".join(comparison.summary_lines())
    assert f"left float: {sensitive}" in lines and "meets the margin" in lines and "speed at batch 1" in lines
    assert comparison.to_dict()["control"]["float_layers"] == [sensitive]
    assert leftovers(tmp_path) == []


def test_a_margin_that_cannot_be_met_writes_nothing_unless_asked(tmp_path, sensitive_digits_model):
    fp32, _, source = _export_sensitive(tmp_path, sensitive_digits_model)
    int8 = tmp_path / "s.int8.onnx"
    missed = _quantize_controlled(fp32, int8, source, margin=1.0, max_float=0)
    assert missed.missed_margin and not missed.written and not int8.exists()
    assert missed.control.float_layers == [] and missed.control.ranking == []  # no fallback allowed: nothing ranked
    line = missed.control.missed_line()
    assert "not written (exit status 3" in line and "--int8-margin 1.00" in line
    assert missed.to_dict()["missed_margin"] is True and missed.to_dict()["written"] is False
    kept = _quantize_controlled(fp32, int8, source, margin=1.0, max_float=0, keep_anyway=True)
    assert kept.missed_margin and kept.written and int8.exists() and kept.control.kept_anyway
    assert "kept anyway" in kept.control.missed_line()
    assert leftovers(tmp_path) == []


def test_cli_export_int8_margin_missed_exit_status_and_keep_anyway(cli, tmp_path, registered, sensitive_digits_model):
    from compressor.checkpoint import ModelMeta, save_model
    from export.int8_control import MISSED_MARGIN_STATUS
    from recipes.cli._options import MISSED_MARGIN_STATUS as CLI_STATUS

    assert MISSED_MARGIN_STATUS == CLI_STATUS == 3
    name = registered("exporttest_digitsnet", SmallNet)
    model, source = sensitive_digits_model
    ckpt = tmp_path / "sensitive.pt"
    save_model(ckpt, model, ModelMeta.from_source(name, source, width=16))
    args = ("export", str(ckpt), "-o", str(tmp_path / "student.onnx"), "--int8", "--data", "digits",
            "--exporter", FAST, "--int8-max-float", "0", "--report", str(tmp_path / "r.json"))
    result = cli(*args)
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "int8 file not written (exit status 3" in errors[0]
    assert (tmp_path / "student.onnx").exists() and not (tmp_path / "student.int8.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())["int8"]
    assert report["missed_margin"] is True and report["written"] is False
    result = cli(*args, "--keep-int8-anyway")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student.int8.onnx").exists() and "kept anyway" in result.output
    # the default lets layers fall back: the sensitive conv goes float and the file is written
    result = cli(*args[:-4], "--report", str(tmp_path / "r2.json"))
    assert result.exit_code == 0, result.output
    control = json.loads((tmp_path / "r2.json").read_text())["int8"]["control"]
    assert control["met_margin"] and len(control["float_layers"]) == 1


def test_deploy_step_holds_int8_to_the_margin_and_drops_a_stale_file(tmp_path, registered, sensitive_digits_model):
    """The main command's deploy step (recipes/deploy.py) runs the same accuracy control."""
    from compressor.checkpoint import ModelMeta
    from recipes.deploy import export_with_data

    name = registered("exporttest_digitsnet", SmallNet)
    model, source = sensitive_digits_model
    meta = ModelMeta.from_source(name, source, width=16)
    int8 = tmp_path / "student.int8.onnx"
    deployment = export_with_data(model, meta, tmp_path / "student.onnx", source, int8_path=int8, int8_margin=1.0)
    control = deployment.int8["control"]
    assert deployment.int8["written"] and int8.exists() and control["met_margin"] and len(control["float_layers"]) == 1
    assert any("left float" in line for line in deployment.lines)
    # a model that cannot fit: nothing is written, and an earlier run's int8 file (a resume) is removed
    deployment = export_with_data(model, meta, tmp_path / "student.onnx", source, int8_path=int8, int8_margin=1.0,
                                  int8_max_float=0)
    assert deployment.int8["missed_margin"] and not deployment.int8["written"] and not int8.exists()


def test_main_command_exit_status_when_int8_missed_the_margin(cli, tmp_path, monkeypatch):
    """Everything else was written; the one line and status 3 say the int8 file was not."""
    from recipes.compress import CompressResult
    from recipes.results import Report, StudentFigures

    verdict = "int8 file not written (exit status 3; the fp32 model and the rest were): the best int8 model loses 5.00"
    report = Report(StudentFigures("resnet8", int8={"missed_margin": True, "written": False,
                                                    "control": {"verdict": verdict}}))
    seen = {}

    def fake_compress(**kwargs):
        seen.update(kwargs)
        return CompressResult(tmp_path, None, report, {"student.onnx": str(tmp_path / "student.onnx")})

    monkeypatch.setattr("recipes.compress.compress", fake_compress)
    monkeypatch.setattr("recipes.report.summary_rows", lambda r: [("architecture", "-", "resnet8")])
    result = cli("--teacher", "t.pt", "--budget", "1MFLOPs", "--int8", "--int8-margin", "0.5")
    assert result.exit_code == 3, result.output
    assert seen["int8_margin"] == 0.5 and seen["keep_int8_anyway"] is False
    assert result.output.strip().splitlines()[-1] == f"error: {verdict}"
    report.student.int8["written"] = True  # --keep-int8-anyway wrote it: a normal exit
    result = cli("--teacher", "t.pt", "--budget", "1MFLOPs", "--int8", "--keep-int8-anyway")
    assert result.exit_code == 0 and seen["keep_int8_anyway"] is True


def test_a_float_last_layer_keeps_the_graph_output_and_runs_in_float(tmp_path, digits_model):
    """The classifier at the end: its QuantizeLinear fed the graph output, which keeps its name."""
    import numpy as np

    from export.quantize import quantize_int8, quantized_layers
    from export.runtime import make_session, run_logits

    model, source = digits_model
    fp32, int8 = tmp_path / "d.onnx", tmp_path / "d.int8.onnx"
    export_model(model, fp32, input_shape=(1, 8, 8), exporter=FAST, measure_cost=False, log=None)
    calibration = [source.sample("train", 64, seed=0).x]
    full = tmp_path / "full.onnx"
    quantize_int8(fp32, full, calibration)
    gemm = next(name for name, op in quantized_layers(full) if op == "Gemm")
    result = quantize_int8(fp32, int8, calibration, exclude=[gemm])
    assert result.float_layers == [gemm] and gemm not in [name for name, _ in quantized_layers(int8)]
    proto = onnx.load(str(int8))
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert next(n for n in proto.graph.node if n.name == gemm).output == ["logits"]
    onnx.checker.check_model(proto, full_check=True)
    assert _optimized_op(int8, gemm) == "Gemm"  # not QGemm
    x = source.sample("test", 16, seed=0).x.numpy()
    assert np.isfinite(run_logits(make_session(int8), x)).all()
