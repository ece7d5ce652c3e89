"""export/targets: the registry, each target's export with parity in its own runtime on a digits
model, metadata that round-trips, the missing-extra and unknown-target lines, ORT's mobile-usability
findings, and `--target` on `kdcompress export` and on the main command.

A target's tests skip only when its extra (``pip install 'kdcompress[NAME]'``) is not installed;
CI installs them all (.ci/run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _export_models import FAST, SmallNet, digits_net, leftovers, registered
from compressor.errors import UserError
from export.latency import Timing
from export.metadata import ExportMetadata
from export.parity import ParityError
from export.targets import Target, bench_target, export_targets, get_target, path_for, target_names

__all__ = ["registered"]

TARGETS = ["onnx", "ort", "executorch", "openvino", "tflite"]


def needs(name: str) -> Target:
    """The target, or a skip when its extra is not installed (the only reason a target test skips)."""
    target = get_target(name)
    for module in target.modules:
        pytest.importorskip(module, reason=f"pip install 'kdcompress[{target.extra}]'")
    return target


@pytest.fixture(scope="module")
def digits():
    """A CNN trained on digits for a few epochs (seconds on CPU), its data, and the metadata an app needs."""
    model, source = digits_net(3)
    meta = ExportMetadata(mean=list(source.mean), std=list(source.std), class_names=list(source.class_names),
                          num_classes=10, arch="smallnet", dataset="digits")
    return model, source, meta


def test_every_registered_target_has_conversion_parity_metadata_and_latency():
    assert set(TARGETS) <= set(target_names()) and target_names()[0] == "onnx"
    suffixes = set()
    for name in target_names():
        target = get_target(name)
        cls = type(target)
        assert cls.convert is not Target.convert or cls.export is not Target.export, name  # its conversion
        assert cls.load is not Target.load and cls.read_metadata is not Target.read_metadata, name  # runtime, metadata
        assert callable(target.parity) and callable(target.runner), name  # parity and latency through its runtime
        assert target.runtime and target.title and (target.extra is None or target.modules), name
        assert path_for("out/student.onnx", target) == Path("out/student" + target.suffix)
        suffixes.add(target.suffix)
    assert len(suffixes) == len(target_names())  # one file name per target beside -o


def test_unknown_target_is_one_line_listing_the_known_ones(cli, tmp_path, registered):
    with pytest.raises(UserError, match="unknown export target 'coreml': choose from onnx, "):
        get_target("coreml")
    ckpt = _checkpoint(tmp_path, registered)
    result = cli("export", str(ckpt), "-o", str(tmp_path / "s.onnx"), "--target", "onnx", "--target", "coreml")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: unknown export target 'coreml': choose from {', '.join(target_names())}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]  # nothing written, not even the ONNX file


def test_a_missing_extra_is_one_line_naming_the_pip_command(cli, tmp_path, registered, monkeypatch):
    for name in ("executorch", "openvino", "tflite"):
        monkeypatch.setattr(type(get_target(name)), "modules", ("kdcompress_no_such_module",))
    ckpt = _checkpoint(tmp_path, registered)
    for name in ("executorch", "openvino", "tflite"):
        result = cli("export", str(ckpt), "-o", str(tmp_path / "s.onnx"), "--target", "onnx", "--target", name)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: export target {name} needs ")
        assert lines[0].endswith(f"not installed here: pip install 'kdcompress[{name}]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


@pytest.mark.parametrize("name", TARGETS)
def test_target_exports_a_digits_model_with_parity_in_its_own_runtime(name, tmp_path, digits):
    target = needs(name)
    model, source, meta = digits
    inputs = source.sample("test", 32, seed=0).x
    results = export_targets(model, tmp_path / "student.onnx", [name], inputs=inputs, inputs_from_data=True,
                             metadata=meta, exporter=FAST, log=None)
    assert list(results) == [name]
    result = results[name]
    parity = result.parity
    assert parity.passed and parity.max_abs_diff <= 1e-4 and parity.top1_agreement == 1.0
    assert parity.samples == 32 and parity.inputs == "data" and target.provider() in parity.provider
    main = tmp_path / ("student" + target.suffix)
    assert result.path == str(main) and all(Path(f).is_file() for f in result.files)
    assert result.bytes == sum(Path(f).stat().st_size for f in result.files) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(f).name for f in result.files)  # no ONNX kept
    assert leftovers(tmp_path) == []
    # the metadata an app reads from the file itself, through the target's own tools
    back = target.read_metadata(main)
    assert back.mean == meta.mean and back.std == meta.std and back.class_names == meta.class_names
    assert back.input_size == [8, 8] and back.in_chans == 1 and back.flops > 0
    if name != "onnx":
        assert back.extra["target"] == name and back.extra["converter"] == result.converter
    # the file in its runtime, on images the parity check did not see, gives PyTorch's classes
    fresh = source.sample("test", 4, seed=1).x
    predict = target.load(main, threads=1)
    got = np.concatenate([predict(fresh[i:i + 1].numpy()) for i in range(len(fresh))])
    with torch.no_grad():
        expected = model(fresh).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    stats = bench_target(name, main, input_shape=(1, 8, 8), threads=1, timing=Timing(warmup=1, min_runs=3, min_time=0))
    assert stats.runs >= 3 and stats.p50_ms > 0 and stats.backend == target.runtime and stats.threads == 1


def test_a_target_whose_file_fails_parity_keeps_nothing(tmp_path, digits, monkeypatch):
    """The base class's rule, through ORT (always installed): converted, checked in its runtime,
    refused, and the user's earlier file is left as it was."""
    model, source, meta = digits
    target = get_target("ort")
    honest = type(target).load
    monkeypatch.setattr(type(target), "load", lambda self, path, threads=None: (
        lambda x, run=honest(self, path, threads): run(x) + 0.01))
    (tmp_path / "student.ort").write_bytes(b"the user's earlier file")
    with pytest.raises(ParityError, match=r"ort: parity FAILED: max \|logit diff\| 1.00e-02"):
        export_targets(model, tmp_path / "student.onnx", ["ort"], inputs=source.sample("test", 8, seed=0).x,
                       inputs_from_data=True, metadata=meta, exporter=FAST, log=None)
    assert (tmp_path / "student.ort").read_bytes() == b"the user's earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.ort"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["executorch", "tflite"])
def test_a_model_the_converter_cannot_take_is_one_line_and_no_file(name, tmp_path):
    from _export_models import DataDependent, seeded

    needs(name)
    with pytest.raises(UserError, match=f"^{name} conversion failed: ") as info:
        export_targets(seeded(DataDependent()), tmp_path / "m.onnx", [name], input_shape=(3, 16, 16), log=None)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_cli_export_several_targets_with_ort_mobile_findings_in_the_report(cli, tmp_path, registered, digits):
    from compressor.checkpoint import ModelMeta, save_model

    name = registered("targetstest_digitsnet", SmallNet)
    model, source, _ = digits
    ckpt = tmp_path / "digits.pt"
    save_model(ckpt, model, ModelMeta.from_source(name, source, width=16))
    out = tmp_path / "student.onnx"
    result = cli("export", str(ckpt), "-o", str(out), "--data", "digits", "--target", "onnx", "--target", "ort",
                 "--target", "ort", "--exporter", FAST, "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert result.output.count("parity passed") == 2 and "mobile usability (onnxruntime's check): NNAPI" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["targets"]) == ["onnx", "ort"]  # keyed by target, a repeated target once
    assert report["export"] == report["targets"]["onnx"] and report["export"]["export"]["exporter"] == FAST
    ort = report["targets"]["ort"]
    assert ort["parity"]["passed"] and ort["parity"]["samples"] == 32 and ort["parity"]["inputs"] == "data"
    assert ort["files"] == [str(tmp_path / "student.ort"), str(tmp_path / "student.required_operators.config")]
    config = (tmp_path / "student.required_operators.config").read_text().splitlines()
    assert ort["required_operators"] == [line for line in config if line and not line.startswith("#")]
    assert any(op.endswith(";Conv") or op.endswith(";FusedConv") for op in ort["required_operators"])
    usability = ort["mobile_usability"]
    assert set(usability["providers"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    for verdict in usability["providers"].values():
        assert verdict["as_is"] in ("YES", "MAYBE", "NO")
    # the batch dimension is dynamic: NNAPI cannot take it as is; the check says what fixed shapes would give
    assert usability["providers"]["NNAPI"]["as_is"] == "NO" and usability["providers"]["NNAPI"]["fixed_shapes"] == "YES"
    assert any("dynamic shape" in m for m in usability["messages"])
    assert ort["metadata"]["extra"]["target"] == "ort" and ort["metadata"]["class_names"] == list(source.class_names)


def test_cli_int8_needs_the_onnx_target(cli, tmp_path, registered):
    ckpt = _checkpoint(tmp_path, registered)
    result = cli("export", str(ckpt), "-o", str(tmp_path / "s.onnx"), "--target", "ort", "--int8", "--data", "digits")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: int8 quantizes the ONNX file: add the onnx target (--target onnx)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_main_command_exports_every_installed_target_and_reports_each(cli, cache_dir, tmp_path):
    """The main job on digits with every target whose extra is installed (all of them in CI)."""
    from recipes.training import train_vanilla

    teacher = tmp_path / "resnet8.pt"
    train_vanilla("resnet8", "digits", teacher, epochs=2, progress="off")
    installed = [n for n in target_names() if not get_target(n).missing()]
    out = tmp_path / "run"
    args = ["--teacher", str(teacher), "--budget", "0.1MFLOPs", "--epochs", "1", "--out", str(out)]
    result = cli(*args, *[a for n in installed for a in ("--target", n)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    student = report["student"]
    assert list(student["targets"]) == installed
    for name, row in student["targets"].items():
        assert row["passed"] and row["max_abs_diff"] <= row["atol"] and row["top1_agreement"] == 1.0, name
        assert row["samples"] == 64 and row["inputs"] == "data" and Path(row["path"]).is_file(), name
        assert all(Path(f).name in report["files"] for f in row["files"]), name
        if name != "onnx":
            assert student["latency"]["targets"][name]["p50_ms"] > 0, name
    assert student["onnx"]["path"] == student["targets"]["onnx"]["path"] == str(out / "student.onnx")
    markdown = (out / "report.md").read_text()
    for name in installed:
        assert f"\n| {name} | student" in markdown, name
    assert "ort: onnxruntime's mobile-usability check: NNAPI: NO as is" in markdown  # the batch is dynamic
    table = result.output.splitlines()
    assert all(any(line.startswith(f"latency, {n} in ") for line in table) for n in installed if n != "onnx")


def test_a_run_folder_counts_every_targets_files_as_its_own(tmp_path):
    """--force may replace a run that wrote other targets; a file no target writes stays foreign."""
    from recipes.run_folder import foreign_files

    names = ["student.pte", "student.xml", "student.bin", "student.ort", "student.required_operators.config",
             "student.tflite", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert [p.name for p in foreign_files(tmp_path)] == ["notes.txt"]


def _checkpoint(folder: Path, registered) -> Path:
    from _export_models import make_checkpoint, seeded

    return make_checkpoint(folder, registered("targetstest_smallnet", SmallNet), seeded(SmallNet()))
