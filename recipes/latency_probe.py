"""Latency budgets are measured, not estimated: export a zoo candidate and time it at batch 1.

The same exporter and session settings as the deployed student, so the figure is what it will run at."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from recipes.search import LatencyFn


def zoo_latency_probe(num_classes: int, input_shape: tuple[int, ...], threads: int = 1) -> LatencyFn:
    """A function arch -> p50 milliseconds of onnxruntime at batch 1 (memoised for this plan)."""
    from compressor.models import create

    time_model = module_latency_probe(input_shape, threads)

    @functools.lru_cache(maxsize=None)
    def probe(arch: str) -> float:
        return time_model(create(arch, num_classes=num_classes, in_chans=input_shape[0]).eval())

    return probe


def module_latency_probe(input_shape: tuple[int, ...], threads: int = 1):
    """A function module -> p50 milliseconds of onnxruntime at batch 1 (a pruned teacher is timed so)."""
    import onnx
    import torch

    from export.latency import Timing, bench_onnx
    from export.onnx_export import export_graph

    timing = Timing(warmup=10, min_runs=50, min_time=0.3, max_runs=2000)

    def probe(model: torch.nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            # the graph the deployed student would have; a random-init candidate is only timed, so
            # no parity gate (its untrained logits can be huge, and their values do not matter here)
            graph = export_graph(model.eval(), torch.zeros(1, *input_shape), log=None)
            onnx.save(graph.proto, str(path))
            return bench_onnx(path, batch=1, threads=threads, timing=timing, input_shape=input_shape).p50_ms

    return probe
