"""Export targets: one registry of the file formats a student is shipped in.

    onnx        .onnx   ONNX (the default)                      onnxruntime
    ort         .ort    onnxruntime's mobile ORT format          onnxruntime
    executorch  .pte    ExecuTorch program lowered to XNNPACK    ExecuTorch's Python runtime
    openvino    .xml    OpenVINO IR (.xml + .bin)                OpenVINO runtime
    tflite      .tflite LiteRT flatbuffer (litert-torch)         ai-edge-litert Interpreter

Each target (``export/targets/<name>_target.py``, a :class:`Target` registered with
``@register_target``) owns its conversion, its parity check in its own runtime, its metadata and
its latency runner; modules here are found and imported by themselves, so adding a target is one
file. :func:`export_targets` exports one model to several targets, ONNX first (the ``ort`` and
``openvino`` targets convert the verified ONNX file), and returns the results keyed by target.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TypeVar

import torch
import torch.nn as nn

from compressor.errors import UserError
from export.metadata import ExportMetadata
from export.onnx_export import DEFAULT_OPSET, Log, stderr_log
from export.parity import DEFAULT_ATOL
from export.targets._base import ConvertJob, MissingExtra, Target, TargetResult

if TYPE_CHECKING:
    from export.latency import LatencyStats, Timing

DEFAULT_TARGETS = ("onnx",)
_TARGETS: dict[str, Target] = {}
_discovered = False

T = TypeVar("T", bound=type[Target])


def register_target(cls: T) -> T:
    """Class decorator: make a target available by its ``name``."""
    if cls.name in _TARGETS and type(_TARGETS[cls.name]) is not cls:
        raise ValueError(f"export target {cls.name!r} is registered twice")
    _TARGETS[cls.name] = cls()
    return cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        from compressor.plugins import import_submodules

        _discovered = True
        import_submodules(__name__, __path__)


def target_names() -> list[str]:
    """Every registered target, ONNX first."""
    _discover()
    return sorted(_TARGETS, key=lambda n: (_TARGETS[n].rank, n))


def get_target(name: str) -> Target:
    """The target called ``name``; an unknown name is one line listing the known ones."""
    names = target_names()
    if name not in _TARGETS:
        raise UserError(f"unknown export target {name!r}: choose from {', '.join(names)}")
    return _TARGETS[name]


def resolve_targets(names: Sequence[str]) -> list[Target]:
    """The targets named (duplicates dropped, ONNX first), each checked to be installed: a missing
    extra is one line before any work starts."""
    targets = [get_target(n) for n in dict.fromkeys(names)]
    if not targets:
        raise UserError(f"no export target given: choose from {', '.join(target_names())}")
    for target in targets:
        target.require()
    return sorted(targets, key=lambda t: t.rank)


def path_for(out: str | os.PathLike, target: Target) -> Path:
    """The main file of ``target`` beside ``out``: student.onnx -> student.pte, student.xml, ..."""
    out = Path(out)
    return out if out.suffix == target.suffix else out.with_suffix(target.suffix)


def export_targets(
    model: nn.Module,
    out_path: str | os.PathLike,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    inputs: torch.Tensor | None = None,
    inputs_from_data: bool = False,
    input_shape: Sequence[int] | None = None,
    metadata: ExportMetadata | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    simplify: bool = False,
    atol: float = DEFAULT_ATOL,
    measure_cost: bool = True,
    log: Log | None = stderr_log,
) -> dict[str, TargetResult]:
    """Export ``model`` to every target in ``targets``, each file beside ``out_path`` with the
    target's suffix, each verified in its own runtime before it is kept (see :mod:`export.targets._base`).

    A target converted from ONNX when ``onnx`` is not asked for gets a verified ONNX file in a
    temporary folder, which is not kept. Raises on the first failure (files of the targets done
    before it are kept: each was verified on its own).
    """
    from export.pipeline import fill_cost, prepare_inputs

    chosen = resolve_targets(targets)
    dest = Path(out_path)
    for target in chosen:
        folder = path_for(dest, target).resolve().parent
        if not folder.is_dir():  # before minutes of work, not after
            raise UserError(f"folder {folder} does not exist: create it first")
    meta = copy.deepcopy(metadata) if metadata is not None else ExportMetadata()
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":  # the converters and runtimes here are CPU ones
        model = copy.deepcopy(model).cpu()
    model.eval()
    inputs, inputs_from_data, shape = prepare_inputs(model, meta, inputs, inputs_from_data, input_shape)
    inputs = inputs.detach().float().cpu()
    if measure_cost:
        fill_cost(model, meta, shape)
    job = ConvertJob(model, inputs, inputs_from_data, meta, atol, opset=opset, exporter=exporter, simplify=simplify,
                     log=log)
    results: dict[str, TargetResult] = {}
    with tempfile.TemporaryDirectory(prefix="kdcompress-targets-") as scratch:
        for target in chosen:
            if target.from_onnx and job.onnx_path is None:  # ONNX not asked for: verified, used, not kept
                job.onnx_path = Path(get_target("onnx").export(job, Path(scratch) / "model.onnx").path)
            results[target.name] = result = target.export(job, path_for(dest, target))
            if target.name == "onnx":
                job.onnx_path = Path(result.path)
    return results


def bench_target(
    name: str,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    batch: int = 1,
    threads: int | None = None,
    timing: "Timing | None" = None,
    label: str | None = None,
) -> "LatencyStats":
    """Latency of one target file in its own runtime: the same timing loop and statistics as
    :func:`export.latency.bench_onnx` (warm-up, then runs until both minimums are met)."""
    from export.latency import Timing, sample, summarize
    from export.runtime import all_cores

    target = get_target(name)
    target.require()
    threads = threads or all_cores()
    timing = timing or Timing()
    run, provider = target.runner(Path(path), batch=batch, threads=threads, input_shape=input_shape)
    got = sample(run, timing)
    return summarize(got.wall, label=label or name, backend=target.runtime, provider=provider, batch=batch,
                     threads=threads, warmup=timing.warmup, cpu_times=got.cpu)


__all__ = [
    "DEFAULT_TARGETS",
    "ConvertJob",
    "MissingExtra",
    "Target",
    "TargetResult",
    "bench_target",
    "export_targets",
    "get_target",
    "path_for",
    "register_target",
    "resolve_targets",
    "target_names",
]
