"""PyTorch -> ONNX graph, with a deliberate choice of exporter and a fallback to the other one.

Which exporter is primary, and why (measured on this machine, torch 2.14.1 / onnxruntime 1.32,
torchvision models at 3x32x32, see the export helper's report):

* **dynamo** (``torch.onnx.export(..., dynamo=True)``, torch.export + onnxscript) is primary.
  Its graphs are cleaner: no ``Identity``/``Constant`` clutter and no
  ``Shape -> Gather -> Unsqueeze -> Concat`` chains around reshapes with a dynamic batch
  (torchvision ShuffleNetV2 x0.5: 173 nodes against 954 from TorchScript, and 0.19 ms against
  0.33 ms per image in onnxruntime at batch 1, one thread; ResNet-18 49 against 65 nodes and
  MobileNetV2 100 against 209, equally fast within noise). Both exporters match PyTorch to
  ~1e-6. It is also the exporter PyTorch maintains; the TorchScript one is deprecated.
* **torchscript** (``dynamo=False``) is the fallback, and the primary for ``opset < 18``: dynamo
  emits opset 18 or newer only (its down-conversion to 17 fails on ReduceMean). It exports in
  well under a second where dynamo takes 3-10 s, and traces models torch.export rejects
  (data-dependent Python control flow), at the price of baking that control flow in, which the
  parity check that follows every export is there to catch.

When the primary raises, the other is tried and the reason is reported (``log`` and
``ExportedGraph.notes``); the exporter that wrote the graph is recorded in ``ExportedGraph.exporter``
and, by the pipeline, in the file's metadata. When both fail on an operator ONNX has no
translation for, the error names the operator and the module that calls it (:mod:`export.op_locate`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import onnx
import torch
import torch.nn as nn

from compressor.errors import UserError
from export.op_locate import describe_unexportable

MIN_OPSET = 17
DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class ExportedGraph:
    """An in-memory ONNX model and how it was made (nothing is on disk yet)."""

    proto: onnx.ModelProto
    exporter: str
    opset: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # fallbacks and why

    def to_dict(self) -> dict:
        return {
            "exporter": self.exporter,
            "opset": self.opset,
            "export_seconds": round(self.seconds, 3),
            "nodes": len(self.proto.graph.node),
            "notes": list(self.notes),
        }


def _export_dynamo(model: nn.Module, sample: torch.Tensor, opset: int, input_name: str, output_name: str) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(
        model,
        (sample,),
        None,
        dynamo=True,
        opset_version=opset,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=({0: batch},),
        external_data=False,  # one self-contained file for the app
        optimize=True,
        verbose=False,
    )
    return program.model_proto


def _export_torchscript(
    model: nn.Module, sample: torch.Tensor, opset: int, input_name: str, output_name: str
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (sample,),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=True,
    )
    return onnx.load_from_string(buffer.getvalue())


EXPORTERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "dynamo": _export_dynamo,
    "torchscript": _export_torchscript,
}


def exporter_order(requested: str, opset: int) -> list[str]:
    """Exporters to try, first to last. ``auto`` tries both; a named exporter is tried alone."""
    if requested == "auto":
        return ["dynamo", "torchscript"] if opset >= DYNAMO_MIN_OPSET else ["torchscript", "dynamo"]
    if requested not in EXPORTERS:
        raise UserError(f"unknown exporter {requested!r}: choose auto, {', '.join(EXPORTERS)}")
    return [requested]


@contextlib.contextmanager
def _native_output_discarded():
    """The TorchScript exporter's C++ side prints a whole IR graph (fd 1/2) before raising."""
    saved: list[tuple[int, int]] = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(devnull.fileno(), fd)
                except OSError:  # no such fd (embedded interpreter): nothing to silence
                    pass
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _quiet():
    """Exporters talk (deprecation notes, tracer warnings, progress); keep it out of the user's output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
        io.StringIO()
    ), _native_output_discarded():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The most specific line of an exporter error: the innermost cause's first line."""
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return (text[: limit - 3] + "...") if len(text) > limit else text


def _full_text(err: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def export_graph(
    model: nn.Module,
    sample: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    input_name: str = "input",
    output_name: str = "logits",
    log: Log | None = stderr_log,
) -> ExportedGraph:
    """Export ``model`` (in eval mode) to an in-memory ONNX graph with a dynamic batch dimension.

    ``sample`` is one representative input batch (its batch size should be >1 so no exporter can
    specialise on 1). The model's training/eval mode is restored afterwards.
    """
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too old: use --opset {MIN_OPSET} or newer")
    order = exporter_order(exporter, opset)
    failures: dict[str, BaseException] = {}
    notes: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for name in order:
            start = time.perf_counter()
            try:
                with _quiet(), torch.no_grad():
                    proto = EXPORTERS[name](model, sample, opset, input_name, output_name)
            except Exception as err:  # noqa: BLE001 - any exporter failure means "try the other one"
                failures[name] = err
                remaining = [n for n in order if n not in failures]
                if remaining:
                    note = f"{name} exporter failed ({_first_line(err)}); falling back to {remaining[0]}"
                    notes.append(note)
                    if log:
                        log(f"note: {note}")
                continue
            actual_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
            if actual_opset != opset:
                note = f"{name} exporter wrote opset {actual_opset} (asked for {opset})"
                notes.append(note)
                if log:
                    log(f"note: {note}")
            return ExportedGraph(proto, name, actual_opset, time.perf_counter() - start, notes)
    finally:
        model.train(was_training)
    # TorchScript names the op as the user wrote it (linalg_eigvals); dynamo names its decomposition
    texts = [_full_text(failures[n]) for n in sorted(failures, key=lambda n: n != "torchscript")]
    unexportable = describe_unexportable(model, sample, "\n".join(texts))
    if unexportable:
        raise UserError(f"cannot export to ONNX opset {opset} (tried {' and '.join(order)}): {unexportable}")
    summary = "; ".join(f"{n}: {_first_line(e)}" for n, e in failures.items())
    raise UserError(f"ONNX export failed ({summary})")
