"""onnxruntime sessions configured the same way everywhere (parity, accuracy, latency).

One place decides the session options so that a latency figure and a parity figure describe the
same graph: full graph optimisation (constant folding, Conv+BN/Conv+activation fusion, layout
transforms), sequential execution, and an explicit intra-op thread count.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnxruntime as ort

from compressor.errors import UserError

# Preference order; providers that are installed but not for local inference (Azure) are skipped.
_PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    """Local execution providers present in this onnxruntime build, best first (CUDA, then CPU)."""
    present = set(ort.get_available_providers())
    return [p for p in _PROVIDER_ORDER if p in present]


def all_cores() -> int:
    """Cores this process may run on (the container's share, not the host's): its affinity mask and
    cgroup CPU quota (compressor.threads)."""
    from compressor.threads import machine_cores

    return machine_cores()


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """ORT_ENABLE_ALL, sequential, ``threads`` intra-op threads.

    None follows ``torch.get_num_threads()``: onnxruntime then uses what the process already
    allows PyTorch (all cores by default; one per worker in a parallel test run), instead of a
    second full-size spinning thread pool competing with it.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is None:
        import torch  # here, not at the top: the start-up probe (export/startup_child.py) loads this file without torch

        threads = torch.get_num_threads()
    so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only: a warning per missing CUDA kernel is noise here
    return so


def make_session(
    model: str | os.PathLike | bytes,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """An inference session; ``providers`` defaults to CPU (parity and accuracy are about the graph)."""
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, session_options(threads), providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # onnxruntime's own error types (InvalidGraph, Fail, ...): a file it cannot run
        where = "the model" if isinstance(model, bytes) else str(model)
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"onnxruntime cannot load {where}: {detail[:300]}") from None


def run_logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """First output of the session for one float32 NCHW batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
