"""Latency budgets are measured, not estimated: export a zoo candidate and time it at batch 1."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from recipes.search import LatencyFn


def zoo_latency_probe(num_classes: int, input_shape: tuple[int, ...], threads: int = 1) -> LatencyFn:
    """A function arch -> p50 milliseconds of onnxruntime at batch 1 (memoised for this plan)."""
    from compressor.models import create
    from export.latency import Timing, bench_onnx
    from export.pipeline import export_model

    timing = Timing(warmup=10, min_runs=50, min_time=0.3, max_runs=2000)

    @functools.lru_cache(maxsize=None)
    def probe(arch: str) -> float:
        model = create(arch, num_classes=num_classes, in_chans=input_shape[0]).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            export_model(model, path, input_shape=input_shape, measure_cost=False, log=None)
            return bench_onnx(path, batch=1, threads=threads, timing=timing, input_shape=input_shape).p50_ms

    return probe
