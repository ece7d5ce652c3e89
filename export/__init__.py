"""Deployment: ONNX export with parity checks, int8 quantization, latency benchmarking.

Depends on torch, onnx and onnxruntime (and on ``compressor`` only to read checkpoints and count
FLOPs). Library calls take an ``nn.Module`` (or a path) and return result dataclasses with
``to_dict()``; the CLI (``kdcompress export`` / ``kdcompress bench``) is a thin shell over them.
"""

from export.io import atomic_output, kind_of, load_for_export, metadata_from_model_meta
from export.latency import BenchmarkReport, LatencyStats, Timing, bench_onnx, bench_torch, benchmark, thread_counts
from export.metadata import ExportMetadata, read_metadata, write_metadata
from export.onnx_export import DEFAULT_OPSET, ExportedGraph, export_graph
from export.parity import DEFAULT_ATOL, ParityError, ParityResult, check_parity
from export.pipeline import ExportReport, export_model, quantize_model
from export.quantize import BatchCalibrationReader, Int8Comparison, QuantizeSettings, quantize_int8
from export.simplify import SimplifiedGraph, simplify_graph

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "BatchCalibrationReader",
    "BenchmarkReport",
    "ExportMetadata",
    "ExportReport",
    "ExportedGraph",
    "Int8Comparison",
    "LatencyStats",
    "ParityError",
    "ParityResult",
    "QuantizeSettings",
    "SimplifiedGraph",
    "Timing",
    "atomic_output",
    "bench_onnx",
    "bench_torch",
    "benchmark",
    "check_parity",
    "export_graph",
    "export_model",
    "kind_of",
    "load_for_export",
    "metadata_from_model_meta",
    "quantize_int8",
    "quantize_model",
    "read_metadata",
    "simplify_graph",
    "thread_counts",
    "write_metadata",
]
