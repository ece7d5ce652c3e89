"""Deployment: export to ONNX and the other targets with parity checks, int8 quantization, latency.

Layering rule: ``export`` depends on torch, onnx, onnxruntime and the optional target runtimes
(``export/targets``), and from ``compressor`` only on its leaf modules: ``errors`` (UserError),
``atomic`` (atomic writes), ``threads`` (the usable cores), ``cost`` (fvcore FLOPs of a given
module), ``plugins`` (registry discovery) and the version string. It never loads a checkpoint,
builds a zoo model or reads data: that is ``recipes`` (``recipes/deploy.py``, ``recipes/bench.py``),
which hands ``export`` an ``nn.Module``, sample inputs and an :class:`ExportMetadata`.
Library calls return result dataclasses with ``to_dict()``; the CLI (``kdcompress export`` /
``kdcompress bench``) is a thin shell over ``recipes``.
"""

from export.io import atomic_output, kind_of
from export.latency import BenchmarkReport, LatencyStats, Timing, bench_onnx, bench_torch, benchmark, thread_counts
from export.metadata import ExportMetadata, read_metadata, write_metadata
from export.onnx_export import DEFAULT_OPSET, ExportedGraph, export_graph
from export.parity import DEFAULT_ATOL, ParityError, ParityResult, check_parity
from export.pipeline import ExportReport, export_model, quantize_model
from export.quantize import BatchCalibrationReader, Int8Comparison, QuantizeSettings, quantize_int8
from export.simplify import SimplifiedGraph, simplify_graph
from export.targets import TargetResult, bench_target, export_targets, get_target, target_names

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
    "TargetResult",
    "Timing",
    "atomic_output",
    "bench_onnx",
    "bench_target",
    "bench_torch",
    "benchmark",
    "check_parity",
    "export_graph",
    "export_model",
    "export_targets",
    "get_target",
    "kind_of",
    "quantize_int8",
    "quantize_model",
    "read_metadata",
    "simplify_graph",
    "target_names",
    "thread_counts",
    "write_metadata",
]
