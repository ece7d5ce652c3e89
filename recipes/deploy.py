"""From a trained model to verified deployable files and measured latency, with real data.

``export`` knows nothing of datasets; this module feeds it: a batch of test images for the
parity check, seeded training images for int8 calibration, the test split to compare int8
against fp32, and the normalisation the checkpoint records for the file's metadata.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch.nn as nn

from compressor.checkpoint import ModelMeta
from compressor.errors import UserError

if TYPE_CHECKING:
    from export.metadata import ExportMetadata
    from export.targets import TargetResult

Log = Callable[[str], None]
PARITY_SAMPLES = 64
CALIBRATION_SAMPLES = 300


def metadata_from_model_meta(meta: ModelMeta, source_checkpoint: str | None = None) -> "ExportMetadata":
    """ExportMetadata from a checkpoint's ``ModelMeta`` (what an app needs to feed the exported file)."""
    from export.metadata import ExportMetadata

    return ExportMetadata(
        in_chans=meta.in_chans,
        input_size=list(meta.input_size) if meta.input_size is not None else None,
        mean=list(meta.mean) if meta.mean is not None else None,
        std=list(meta.std) if meta.std is not None else None,
        class_names=list(meta.class_names) if meta.class_names is not None else None,
        num_classes=meta.num_classes,
        arch=meta.arch,
        dataset=meta.dataset,
        source_checkpoint=source_checkpoint,
    )


def load_for_export(
    path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None, trust: bool = False
) -> tuple[nn.Module, "ExportMetadata"]:
    """(model in eval mode, ExportMetadata from what the checkpoint records) for a checkpoint file."""
    from compressor.checkpoint import load_model
    from export.io import kind_of

    if kind_of(path) == "onnx":
        raise UserError(f"{path} is already an ONNX model: export takes a checkpoint (.pt); time it with `kdcompress bench`")
    loaded = load_model(path, arch=arch, num_classes=num_classes, trust=trust)
    return loaded.model.eval(), metadata_from_model_meta(loaded.meta, str(Path(path).resolve()))


def check_fits(meta: "ExportMetadata", source: Any, spec: str) -> None:
    """The data must be what the model takes: same classes, same image shape (the one fit check,
    compressor.trainer.evaluate.check_fits). What the checkpoint does not record (input size,
    normalisation, class names) is taken from the data."""
    from compressor.trainer.evaluate import check_fits as fits

    shape = tuple(source.input_shape)
    recorded = None if meta.input_size is None else (meta.in_chans or shape[0], *meta.input_size)
    fits("the model", meta.num_classes, recorded, meta.in_chans, spec, source.num_classes, shape)
    if meta.input_size is None:
        meta.in_chans, meta.input_size = shape[0], list(shape[1:])
    if meta.mean is None:
        meta.mean, meta.std = list(source.mean), list(source.std)
    if meta.class_names is None:
        meta.class_names = list(source.class_names)


@dataclass
class Deployment:
    onnx: dict[str, Any] | None  # the ONNX file's report (None when ONNX is not a target)
    int8: dict[str, Any] | None = None
    lines: list[str] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # target name -> what the report shows
    files: dict[str, str] = field(default_factory=dict)  # file name -> path, every file written


def check_targets(targets: Sequence[str], *, int8: bool = False) -> list[str]:
    """The target names, checked before any work: known, installed, and ONNX among them for int8."""
    from export.targets import resolve_targets

    names = [t.name for t in resolve_targets(targets)]
    if int8 and "onnx" not in names:
        raise UserError("int8 quantizes the ONNX file: add the onnx target (--target onnx)")
    return names


def target_summary(result: "TargetResult") -> dict[str, Any]:
    """One target's row of the report: its files, size, converter, parity figures and findings."""
    parity = result.parity.to_dict()
    row: dict[str, Any] = {"target": result.target, "path": result.path, "files": list(result.files),
                           "bytes": result.bytes, "converter": result.converter,
                           **{k: parity[k] for k in ("max_abs_diff", "atol", "top1_agreement", "samples", "inputs",
                                                     "provider", "passed")}}
    for key, value in result.details.items():
        if key == "export":  # the ONNX exporter's record: which exporter and opset
            row.update(exporter=value.get("exporter"), opset=value.get("opset"))
        elif key not in ("simplify", "notes"):
            row[key] = value
    return row


def export_with_data(
    model: nn.Module,
    meta: ModelMeta,
    out_path: str | Path,
    source: Any,
    *,
    targets: Sequence[str] = ("onnx",),
    int8_path: str | Path | None = None,
    seed: int = 0,
    source_checkpoint: str | None = None,
    simplify: bool = False,
    int8_margin: float | None = None,
    keep_int8_anyway: bool = False,
    int8_max_float: int | None = None,
    log: Log | None = None,
) -> Deployment:
    """Export to each target (``out_path`` with the target's suffix) with parity on real test images
    in the target's own runtime; optionally int8, calibrated on training images, held to
    ``int8_margin`` top-1 points on the validation split (layers fall back to float until it fits,
    :mod:`export.int8_control`) and compared on the test split. An int8 model that cannot fit is not
    written (and a stale one at ``int8_path`` removed) unless ``keep_int8_anyway``."""
    from export.pipeline import quantize_model
    from export.quantize import DEFAULT_MARGIN_POINTS
    from export.targets import export_targets

    from compressor.threads import threads_for

    names = check_targets(targets, int8=int8_path is not None)
    inputs = source.sample("test", PARITY_SAMPLES, seed=seed).x.cpu()
    with threads_for(model.cpu().eval(), tuple(inputs.shape[1:]), PARITY_SAMPLES):  # the parity runs' threads
        results = export_targets(model, out_path, names, inputs=inputs, inputs_from_data=True,
                                 metadata=metadata_from_model_meta(meta, source_checkpoint), simplify=simplify, log=log)
    deployment = Deployment(onnx=results["onnx"].to_dict() if "onnx" in results else None,
                            lines=[line for r in results.values() for line in r.summary_lines()],
                            targets={name: target_summary(r) for name, r in results.items()},
                            files={Path(f).name: f for r in results.values() for f in r.files})
    if int8_path is not None:
        calibration, test, val = int8_data(source, CALIBRATION_SAMPLES, seed)
        margin = DEFAULT_MARGIN_POINTS if int8_margin is None else int8_margin
        comparison = quantize_model(results["onnx"].path, int8_path, calibration, test, val_batches=val, margin=margin,
                                    keep_anyway=keep_int8_anyway, max_float=int8_max_float, log=log)
        if not comparison.written:  # a resumed run's earlier int8 file would contradict the report
            Path(int8_path).unlink(missing_ok=True)
        deployment.int8 = comparison.to_dict()
        deployment.lines += comparison.summary_lines()
        if comparison.written:
            deployment.files[Path(int8_path).name] = str(int8_path)
    return deployment


def int8_data(source: Any, samples: int, seed: int) -> tuple[list, Any, Any]:
    """(calibration batches of seeded training images, the test loader int8 is compared on, the
    validation loader its accuracy control decides on)."""
    calibration = source.sample("train", samples, seed=seed).x.cpu()
    batches = [calibration[i:i + 32] for i in range(0, len(calibration), 32)]
    return (batches, source.loader("test", 256, shuffle=False, augment=False),
            source.loader("val", 256, shuffle=False, augment=False))


def int8_path_for(out: Path) -> Path:
    """student.onnx -> student.int8.onnx"""
    return out.with_name(out.stem + ".int8" + (out.suffix or ".onnx"))


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    data: str | None = None,
    targets: Sequence[str] = ("onnx",),
    opset: int = 18,
    exporter: str = "auto",
    simplify: bool = False,
    atol: float = 1e-4,
    int8: bool = False,
    int8_output: str | os.PathLike | None = None,
    int8_margin: float = 1.0,
    keep_int8_anyway: bool = False,
    int8_max_float: int | None = None,
    calibration_samples: int = 300,
    calibration_method: str = "minmax",
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    trust: bool = False,
    echo: Log = print,
    log: Log | None = None,
) -> dict[str, Any]:
    """``kdcompress export``: a checkpoint to verified files of each target (``output`` with the
    target's suffix; parity on 32 test images of ``data``, else seeded random inputs, in the
    target's own runtime), optionally an int8 ONNX copy held to ``int8_margin`` on the validation
    split and compared on the test split. Summary lines go to ``echo`` as the files are kept;
    returns {"targets": {name: ...}, "export": the ONNX file's report, "int8": ...}; ``int8``'s
    ``missed_margin`` and ``written`` say whether the int8 file missed the margin and was left out."""
    from compressor.threads import threads_for
    from export.pipeline import quantize_model
    from export.quantize import QuantizeSettings
    from export.targets import export_targets

    names = check_targets(targets, int8=int8)  # an unknown or missing target: one line, before anything
    if int8 and data is None:
        raise UserError("--int8 needs calibration and test images: pass --data SPEC (e.g. --data digits)")
    out = Path(output)
    int8_out = Path(int8_output) if int8_output else int8_path_for(out.with_suffix(".onnx"))
    if int8 and int8_out.resolve() == out.with_suffix(".onnx").resolve():
        raise UserError("--int8-output must differ from --output")
    for path in [out] + ([int8_out] if int8 else []):
        if not path.resolve().parent.is_dir():
            raise UserError(f"folder {path.parent} does not exist: create it first")
    model, meta = load_for_export(checkpoint, arch=arch, trust=trust)

    source, inputs = None, None
    if data is not None:
        from compressor.data import load_source

        source = load_source(data, seed=seed)
        check_fits(meta, source, data)
        inputs = source.sample("test", 32, seed=seed).x
    shape = input_shape
    if shape is None and inputs is None and meta.input_size is None:
        raise UserError(f"{checkpoint} does not record its input size: give --input CxHxW or --data SPEC")
    probe = tuple(inputs.shape[1:]) if inputs is not None else shape or (meta.in_chans or 3, *meta.input_size)
    with threads_for(model.eval(), probe, 32):  # the parity check's threads (onnxruntime follows torch's)
        results = export_targets(model, out, names, inputs=inputs, inputs_from_data=inputs is not None, metadata=meta,
                                 input_shape=shape, opset=opset, exporter=exporter, simplify=simplify, atol=atol, log=log)
    for line in (line for r in results.values() for line in r.summary_lines()):
        echo(line)
    result: dict[str, Any] = {"targets": {name: r.to_dict() for name, r in results.items()}}
    if "onnx" in results:
        result["export"] = result["targets"]["onnx"]
    if int8:
        calibration, test, val = int8_data(source, calibration_samples, seed)
        comparison = quantize_model(results["onnx"].path, int8_out, calibration, test, margin=int8_margin,
                                    settings=QuantizeSettings(calibration_method=calibration_method),
                                    val_batches=val, keep_anyway=keep_int8_anyway, max_float=int8_max_float, log=log)
        for line in comparison.summary_lines():
            echo(line)
        result["int8"] = comparison.to_dict()
        if comparison.missed_margin and not comparison.written:
            result["int8"]["missed_line"] = comparison.control.missed_line()
    return result


def latency_of(model: nn.Module, input_shape: tuple[int, ...], *, threads: int, onnx_path: str | Path | None = None,
               int8_path: str | Path | None = None, targets: dict[str, str] | None = None,
               batch: int = 1) -> dict[str, Any]:
    """Batch-1 latency of eager PyTorch and onnxruntime (exporting to a temporary file if needed),
    and of each other target's file (name -> main file) in its own runtime."""
    from export.latency import bench_onnx, bench_torch
    from export.pipeline import export_model
    from export.targets import bench_target

    out: dict[str, Any] = {"threads": threads, "batch": batch}
    eager = bench_torch(model.cpu().eval(), input_shape, batch=batch, threads=threads)
    out["torch_ms"], out["torch"] = eager.p50_ms, eager.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export_model(model.cpu().eval(), onnx_path, input_shape=input_shape, measure_cost=False, log=None)
        ort = bench_onnx(onnx_path, batch=batch, threads=threads, input_shape=input_shape)
        out["onnx_ms"], out["onnx"] = ort.p50_ms, ort.to_dict()
        if int8_path is not None:
            q = bench_onnx(int8_path, batch=batch, threads=threads, input_shape=input_shape, label="int8")
            out["int8_ms"], out["int8"] = q.p50_ms, q.to_dict()
    others = {name: path for name, path in (targets or {}).items() if name != "onnx"}
    if others:
        out["targets"] = {}
        for name, path in others.items():
            stats = bench_target(name, path, input_shape=input_shape, batch=batch, threads=threads)
            out["targets"][name] = {"p50_ms": stats.p50_ms, "runtime": stats.backend, **stats.to_dict()}
    return out
