"""export/: verified ONNX export, metadata, exporter choice and fallback, simplification, clear errors.

Most exports here use the TorchScript exporter where the exporter does not matter (well under a
second, where dynamo takes seconds); the default (dynamo) path runs in the CLI tests below and for
every zoo family in tests/test_export_families.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _export_models import (
    FAST, DataDependent, Noisy, Shuffled, SmallNet, WithHist, leftovers, make_checkpoint, registered, seeded,
)
from compressor.errors import UserError
from export.io import atomic_output, kind_of
from export.metadata import ExportMetadata, read_metadata
from export.onnx_export import exporter_order
from export.op_locate import ops_in_error
from export.parity import ParityError
from export.pipeline import export_model

__all__ = ["registered"]  # the fixture, imported for the CLI tests


def test_export_passes_parity_with_dynamic_batch_and_named_io(tmp_path):
    model = seeded(SmallNet())
    out = tmp_path / "m.onnx"
    report = export_model(model, out, input_shape=(3, 16, 16), exporter=FAST, opset=18)
    assert report.parity.passed and report.parity.max_abs_diff <= 1e-4 and report.parity.top1_agreement == 1.0
    assert report.parity.samples == 32 and report.parity.inputs == "random"
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # batch sizes the exporter never saw
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
    assert leftovers(tmp_path) == []


def test_metadata_round_trips_through_file_and_onnxruntime(tmp_path):
    model = seeded(SmallNet())
    meta = ExportMetadata(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], class_names=["a", "b"] + [str(i) for i in range(8)],
                          num_classes=10, arch="smallnet", dataset="digits", source_checkpoint="/x/y.pt")
    out = tmp_path / "m.onnx"
    export_model(model, out, input_shape=(3, 16, 16), metadata=meta, exporter=FAST)
    back = read_metadata(out)
    for key in ("mean", "std", "class_names", "num_classes", "arch", "dataset", "source_checkpoint"):
        assert getattr(back, key) == getattr(meta, key), key
    assert back.input_size == [16, 16] and back.in_chans == 3 and back.layout == "NCHW"
    assert back.exporter == "torchscript" and back.opset == 18
    from compressor.cost import measure

    assert back.flops == measure(model, (3, 16, 16)).flops > 0 and "multiply-add" in back.flops_convention
    # what an app sees through onnxruntime
    props = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(props["mean"]) == [0.5, 0.4, 0.3] and json.loads(props["input_size"]) == [16, 16]
    assert meta.exporter is None  # the caller's object is not modified


def test_metadata_from_props_keeps_unknown_and_plain_string_values():
    meta = ExportMetadata.from_props({"mean": "[0.1]", "vendor": '"acme"', "note": "not json"})
    assert meta.mean == [0.1] and meta.extra == {"vendor": "acme", "note": "not json"}
    assert ExportMetadata.from_props(meta.to_props()).to_dict() == meta.to_dict()


def test_parity_failure_keeps_the_users_file_and_no_half_file(tmp_path):
    out = tmp_path / "student.onnx"
    out.write_bytes(b"the user's previous file")
    with pytest.raises(ParityError) as info:
        export_model(seeded(Noisy()), out, input_shape=(3, 16, 16), exporter=FAST)
    result = info.value.result
    assert not result.passed and result.max_abs_diff > 1e-4
    assert "max |logit diff|" in str(info.value) and "FAILED" in str(info.value)
    assert out.read_bytes() == b"the user's previous file"
    assert leftovers(tmp_path) == []


def test_unexportable_op_names_the_op_and_the_module(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError) as info:  # both exporters: test_cli_unexportable_op_is_one_line
        export_model(seeded(WithHist()), out, input_shape=(3, 16, 16), exporter=FAST, log=None)
    message = str(info.value)
    assert "aten::histc" in message and "module 'head.1' (HistPool)" in message and "\n" not in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_ops_in_error_reads_both_exporters_wording():
    assert ops_in_error("Exporting the operator 'aten::histc' to ONNX opset version 17 is not supported") == ["histc"]
    dynamo = "No ONNX function found for <OpOverload(op='aten.kthvalue', overload='default')>"
    assert ops_in_error(dynamo) == ["kthvalue"]
    assert ops_in_error("target=torch.ops.aten.cummax.default](args = (%x, 2)") == ["cummax"]
    assert ops_in_error("something else went wrong") == []


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tmp_path):
    messages: list[str] = []
    report = export_model(seeded(DataDependent()), tmp_path / "m.onnx", input_shape=(3, 16, 16), log=messages.append,
                          measure_cost=False)
    assert report.exporter == "torchscript" and read_metadata(tmp_path / "m.onnx").exporter == "torchscript"
    assert any("dynamo exporter failed" in m and "falling back to torchscript" in m for m in messages)
    assert report.graph.notes and report.parity.passed


def test_exporter_choice_depends_on_opset():
    assert exporter_order("auto", 18) == ["dynamo", "torchscript"]
    assert exporter_order("auto", 17) == ["torchscript", "dynamo"]  # dynamo writes opset >= 18 only
    assert exporter_order("dynamo", 17) == ["dynamo"]
    with pytest.raises(UserError, match="unknown exporter"):
        exporter_order("tflite", 18)


def test_opset_17_and_too_old_opsets(tmp_path):
    report = export_model(seeded(SmallNet()), tmp_path / "m.onnx", input_shape=(3, 16, 16), opset=17,
                          measure_cost=False)
    assert report.exporter == "torchscript" and report.graph.opset == 17
    with pytest.raises(UserError, match="opset 13 is too old"):
        export_model(seeded(SmallNet()), tmp_path / "n.onnx", input_shape=(3, 16, 16), opset=13)


def test_parity_uses_real_inputs_when_given(tmp_path):
    x = torch.randn(20, 3, 16, 16)
    report = export_model(seeded(SmallNet()), tmp_path / "m.onnx", inputs=x, inputs_from_data=True, exporter=FAST,
                          measure_cost=False)
    assert report.parity.samples == 20 and report.parity.inputs == "data"
    with pytest.raises(UserError, match="parity inputs have shape"):
        export_model(seeded(SmallNet()), tmp_path / "n.onnx", inputs=x, input_shape=(3, 8, 8), exporter=FAST)


def test_simplify_shrinks_the_graph_and_is_verified(tmp_path):
    out = tmp_path / "m.onnx"
    report = export_model(seeded(Shuffled()), out, input_shape=(3, 16, 16), exporter=FAST, simplify=True,
                          metadata=ExportMetadata(mean=[0.1, 0.2, 0.3]))
    assert report.simplify_kept and report.simplified_parity.passed
    assert report.simplified.nodes_after < report.simplified.nodes_before  # the shape chains are folded
    assert len(onnx.load(str(out)).graph.node) == report.simplified.nodes_after
    assert read_metadata(out).mean == [0.1, 0.2, 0.3] and read_metadata(out).exporter == "torchscript"


def test_a_simplified_graph_that_fails_parity_is_not_kept(tmp_path, monkeypatch):
    import export.simplify as simplify

    def corrupt(proto):
        broken = onnx.ModelProto()
        broken.CopyFrom(proto)
        bias = next(t for t in broken.graph.initializer if list(t.dims) == [10])  # the classifier's bias
        values = onnx.numpy_helper.to_array(bias) + 1.0 + np.arange(10, dtype=np.float32)
        bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
        return broken

    monkeypatch.setitem(simplify.TOOLS, "onnxslim", corrupt)
    out = tmp_path / "m.onnx"
    warnings: list[str] = []
    report = export_model(seeded(SmallNet()), out, input_shape=(3, 16, 16), exporter=FAST, simplify=True,
                          log=warnings.append, measure_cost=False)
    assert report.simplify_kept is False and not report.simplified_parity.passed
    assert any("failed parity" in w for w in warnings)
    plain = onnx.load(str(out))
    bias = next(t for t in plain.graph.initializer if list(t.dims) == [10])
    np.testing.assert_allclose(onnx.numpy_helper.to_array(bias), seeded(SmallNet()).fc.bias.detach().numpy())
    assert leftovers(tmp_path) == []


def test_kind_of_tells_onnx_from_checkpoint_and_rejects_the_rest(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    export_model(seeded(SmallNet()), onnx_path, input_shape=(3, 16, 16), exporter=FAST, measure_cost=False)
    assert kind_of(onnx_path) == "onnx"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_path.read_bytes())
    assert kind_of(renamed) == "onnx"  # content decides, not the suffix
    pt = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    assert kind_of(pt) == "checkpoint"
    text = tmp_path / "notes.onnx"
    text.write_text("hello, not a model")
    with pytest.raises(UserError, match="neither an ONNX model nor a PyTorch checkpoint"):
        kind_of(text)
    with pytest.raises(UserError, match="does not exist"):
        kind_of(tmp_path / "missing.onnx")


def test_atomic_output_renames_on_success_only(tmp_path):
    dest = tmp_path / "f.txt"
    with atomic_output(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert dest.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_text() == "new" and leftovers(tmp_path) == []
    with pytest.raises(UserError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "f.txt"):
            pass


# --- CLI -------------------------------------------------------------------------------------


def test_cli_export_writes_verified_onnx_with_checkpoint_metadata(cli, tmp_path, registered):
    name = registered("exporttest_smallnet", SmallNet)
    ckpt = make_checkpoint(tmp_path, name, seeded(SmallNet()))
    out = tmp_path / "student.onnx"
    report = tmp_path / "report.json"
    result = cli("export", str(ckpt), "-o", str(out), "--report", str(report))
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.output and "dynamo exporter" in result.output
    meta = read_metadata(out)
    assert meta.mean == [0.5, 0.4, 0.3] and meta.std == [0.2, 0.25, 0.3] and meta.input_size == [16, 16]
    assert meta.class_names == [f"class{i}" for i in range(10)] and meta.arch == name
    assert meta.source_checkpoint == str(ckpt.resolve()) and meta.flops > 0 and meta.exporter == "dynamo"
    saved = json.loads(report.read_text())
    assert saved["export"]["parity"]["passed"] is True and saved["export"]["export"]["exporter"] == "dynamo"


def test_cli_unexportable_op_is_one_line(cli, tmp_path, registered):
    name = registered("exporttest_withhist", WithHist)
    ckpt = make_checkpoint(tmp_path, name, seeded(WithHist()))
    result = cli("export", str(ckpt), "-o", str(tmp_path / "s.onnx"))
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "aten::histc" in error[0] and "'head.1' (HistPool)" in error[0]
    assert "tried dynamo and torchscript" in error[0]
    assert not (tmp_path / "s.onnx").exists()


def test_cli_parity_failure_exits_nonzero_with_figures(cli, tmp_path, registered):
    name = registered("exporttest_noisy", Noisy)
    ckpt = make_checkpoint(tmp_path, name, seeded(Noisy()))
    out = tmp_path / "s.onnx"
    out.write_bytes(b"keep me")
    result = cli("export", str(ckpt), "-o", str(out), "--exporter", FAST)
    assert result.exit_code == 2 and "parity FAILED: max |logit diff|" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me" and leftovers(tmp_path) == []


def test_cli_rejects_what_is_neither_onnx_nor_checkpoint(cli, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model at all")
    for args in (("bench", str(junk)), ("export", str(junk), "-o", str(tmp_path / "o.onnx"))):
        result = cli(*args)
        assert result.exit_code == 2 and "neither an ONNX model nor a PyTorch checkpoint" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_export_refuses_an_onnx_input_and_old_opsets(cli, tmp_path, registered):
    onnx_path = tmp_path / "m.onnx"
    export_model(seeded(SmallNet()), onnx_path, input_shape=(3, 16, 16), exporter=FAST, measure_cost=False)
    result = cli("export", str(onnx_path), "-o", str(tmp_path / "o.onnx"))
    assert result.exit_code == 2 and "already an ONNX model" in result.output
    ckpt = make_checkpoint(tmp_path, registered("exporttest_smallnet", SmallNet), seeded(SmallNet()))
    result = cli("export", str(ckpt), "-o", str(tmp_path / "o.onnx"), "--opset", "11")
    assert result.exit_code == 2 and "opset 11 is too old" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_export_imports_only_the_leaf_modules_of_compressor():
    """The layering rule (export/__init__.py): export never loads checkpoints, models or data."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import importlib, pkgutil, sys, export\n"
            "for info in pkgutil.walk_packages(export.__path__, 'export.'):\n"
            "    importlib.import_module(info.name)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'compressor')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    allowed = {"compressor", "compressor.errors", "compressor.atomic", "compressor.threads", "compressor.cost",
               "compressor.plugins"}
    assert loaded <= allowed, sorted(loaded - allowed)
