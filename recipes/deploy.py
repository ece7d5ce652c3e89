"""From a trained model to verified deployable files and measured latency, with real data.

``export`` knows nothing of datasets; this module feeds it: a batch of test images for the
parity check, seeded training images for int8 calibration, the test split to compare int8
against fp32, and the normalisation the checkpoint records for the file's metadata.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from compressor.checkpoint import ModelMeta

Log = Callable[[str], None]
PARITY_SAMPLES = 64
CALIBRATION_SAMPLES = 300


@dataclass
class Deployment:
    onnx: dict[str, Any]
    int8: dict[str, Any] | None = None
    lines: list[str] = field(default_factory=list)


def export_with_data(
    model: nn.Module,
    meta: ModelMeta,
    out_path: str | Path,
    source: Any,
    *,
    int8_path: str | Path | None = None,
    seed: int = 0,
    source_checkpoint: str | None = None,
    simplify: bool = False,
    int8_margin: float | None = None,
    keep_int8_anyway: bool = False,
    int8_max_float: int | None = None,
    log: Log | None = None,
) -> Deployment:
    """Export with parity on real test images; optionally int8, calibrated on training images, held to
    ``int8_margin`` top-1 points on the validation split (layers fall back to float until it fits,
    :mod:`export.int8_control`) and compared on the test split. An int8 model that cannot fit is not
    written (and a stale one at ``int8_path`` removed) unless ``keep_int8_anyway``."""
    from export.io import metadata_from_model_meta
    from export.pipeline import export_model, quantize_model
    from export.quantize import DEFAULT_MARGIN_POINTS

    from compressor.threads import threads_for

    inputs = source.sample("test", PARITY_SAMPLES, seed=seed).x.cpu()
    with threads_for(model.cpu().eval(), tuple(inputs.shape[1:]), PARITY_SAMPLES):  # the parity runs' threads
        report = export_model(model, out_path, inputs=inputs, inputs_from_data=True,
                              metadata=metadata_from_model_meta(meta, source_checkpoint), simplify=simplify, log=log)
    deployment = Deployment(onnx=report.to_dict(), lines=report.summary_lines())
    if int8_path is not None:
        calibration = source.sample("train", CALIBRATION_SAMPLES, seed=seed).x.cpu()
        batches = [calibration[i:i + 32] for i in range(0, len(calibration), 32)]
        test = source.loader("test", 256, shuffle=False, augment=False)
        val = source.loader("val", 256, shuffle=False, augment=False)
        margin = DEFAULT_MARGIN_POINTS if int8_margin is None else int8_margin
        comparison = quantize_model(out_path, int8_path, batches, test, val_batches=val, margin=margin,
                                    keep_anyway=keep_int8_anyway, max_float=int8_max_float, log=log)
        if not comparison.written:  # a resumed run's earlier int8 file would contradict the report
            Path(int8_path).unlink(missing_ok=True)
        deployment.int8 = comparison.to_dict()
        deployment.lines += comparison.summary_lines()
    return deployment


def latency_of(model: nn.Module, input_shape: tuple[int, ...], *, threads: int, onnx_path: str | Path | None = None,
               int8_path: str | Path | None = None, batch: int = 1) -> dict[str, Any]:
    """Batch-1 latency of eager PyTorch and onnxruntime (exporting to a temporary file if needed)."""
    from export.latency import bench_onnx, bench_torch
    from export.pipeline import export_model

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
    return out
