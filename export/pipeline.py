"""Export, verify, keep: the one call the CLI and the recipe engine make.

Order of work for ``export_model``:
  1. export the graph in memory (dynamo, falling back to TorchScript; :mod:`export.onnx_export`);
  2. write the metadata (normalisation, input size, class names, FLOPs, exporter; :mod:`export.metadata`);
  3. save to a hidden temporary file next to the destination, run ``onnx.checker`` and onnxruntime
     vs PyTorch parity on it (:mod:`export.parity`); a failure raises with the figures and the
     temporary file is removed, so the destination keeps whatever it held before;
  4. optionally simplify, and keep the simplified graph only if it passes the same checks;
  5. rename the verified file onto the destination.
``quantize_model`` does the same for the int8 file: quantize into a temporary file, check it, measure
fp32 and int8 accuracy on the test batches, rename. Given validation batches, it first holds the int8
model to the margin on them, leaving the most sensitive layers float until it fits
(:mod:`export.int8_control`), and does not write a model that cannot fit unless asked to.
Without them, a quantized model that loses more than the margin on the test batches is kept but
flagged (``Int8Comparison.flagged``), loudly, in the summary lines.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import onnx
import torch
import torch.nn as nn

from compressor.errors import UserError
from export.int8_control import DEFAULT_RANKING_SAMPLES, control_int8
from export.io import atomic_output
from export.metadata import ExportMetadata, write_metadata
from export.onnx_export import DEFAULT_OPSET, ExportedGraph, Log, export_graph, stderr_log
from export.parity import DEFAULT_ATOL, ParityResult, check_parity, random_inputs, run_checker
from export.quantize import (
    DEFAULT_MARGIN_POINTS,
    Int8Comparison,
    Int8Quantizer,
    QuantizeSettings,
    compare_int8,
    quantize_int8,
)
from export.simplify import SimplifiedGraph, simplify_graph

PARITY_SAMPLES = 32


@dataclass
class ExportReport:
    path: str
    bytes: int
    graph: ExportedGraph
    parity: ParityResult
    metadata: ExportMetadata
    simplified: SimplifiedGraph | None = None
    simplified_parity: ParityResult | None = None
    simplify_kept: bool | None = None
    notes: list[str] = field(default_factory=list)
    nodes: int = 0  # in the kept file

    @property
    def exporter(self) -> str:
        return self.graph.exporter

    def summary_lines(self) -> list[str]:
        lines = [
            f"exported {self.path} ({self.bytes / 1e6:.2f} MB, opset {self.graph.opset}, "
            f"{self.graph.exporter} exporter, {self.nodes} nodes)",
            f"  {self.parity.summary()}",
            f"  metadata: {_describe_metadata(self.metadata)}",
        ]
        if self.simplified is not None:
            verdict = "kept" if self.simplify_kept else "NOT kept (parity failed; the plain export is kept)"
            lines.append(
                f"  simplified with {self.simplified.tool}: {self.simplified.nodes_before} -> "
                f"{self.simplified.nodes_after} nodes, {verdict}"
            )
            if self.simplified_parity is not None:
                lines.append(f"    {self.simplified_parity.summary()}")
        return lines  # the notes were logged as they happened, and are in to_dict()

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "nodes": self.nodes,
            "export": self.graph.to_dict(),
            "parity": self.parity.to_dict(),
            "simplify": None
            if self.simplified is None
            else {
                **self.simplified.to_dict(),
                "kept": self.simplify_kept,
                "parity": self.simplified_parity.to_dict() if self.simplified_parity else None,
            },
            "metadata": self.metadata.to_dict(),
            "notes": list(self.notes),
        }


def _describe_metadata(meta: ExportMetadata) -> str:
    from compressor.cost import format_flops

    parts = []
    if meta.in_chans and meta.input_size:
        parts.append(f"input {meta.in_chans}x{meta.input_size[0]}x{meta.input_size[1]}")
    if meta.mean is not None:
        parts.append(f"mean {[round(m, 4) for m in meta.mean]} std {[round(s, 4) for s in (meta.std or [])]}")
    else:
        parts.append("no normalisation recorded")
    if meta.class_names:
        parts.append(f"{len(meta.class_names)} class names")
    if meta.flops is not None:
        parts.append(f"{format_flops(meta.flops)} (1 FLOP = 1 multiply-add)")
    return ", ".join(parts)


def _input_shape(model: nn.Module, meta: ExportMetadata, inputs: torch.Tensor | None, shape) -> tuple[int, ...]:
    if shape is not None:
        return tuple(int(s) for s in shape)
    if inputs is not None:
        return tuple(int(s) for s in inputs.shape[1:])
    if meta.in_chans and meta.input_size:
        return (int(meta.in_chans), *map(int, meta.input_size))
    raise UserError(f"cannot tell the input shape of {type(model).__name__}: give input_shape or sample inputs")


def prepare_inputs(
    model: nn.Module, meta: ExportMetadata, inputs: torch.Tensor | None, inputs_from_data: bool,
    input_shape: Sequence[int] | None,
) -> tuple[torch.Tensor, bool, tuple[int, ...]]:
    """(parity inputs, whether they are data, input shape): a seeded random batch when none is given.
    Records the input shape in ``meta``."""
    shape = _input_shape(model, meta, inputs, input_shape)
    if inputs is not None and len(inputs) == 0:
        raise UserError("the parity inputs are empty: give at least one sample")
    if inputs is None:
        inputs, inputs_from_data = random_inputs(shape, PARITY_SAMPLES), False
    if tuple(inputs.shape[1:]) != shape:
        raise UserError(f"parity inputs have shape {tuple(inputs.shape[1:])} but the model takes {shape}")
    meta.in_chans, meta.input_size = shape[0], list(shape[1:])
    return inputs, inputs_from_data, shape


def fill_cost(model: nn.Module, meta: ExportMetadata, input_shape: tuple[int, ...]) -> None:
    """FLOPs and parameters (fvcore) into ``meta``, unless it already has them."""
    if meta.flops is not None:
        return
    from compressor.cost import FLOP_CONVENTION, measure

    with warnings.catch_warnings():  # importing fvcore warns that torch.jit.script is deprecated
        warnings.simplefilter("ignore")
        cost = measure(model, input_shape)
    meta.flops, meta.params, meta.flops_convention = cost.flops, cost.params, FLOP_CONVENTION


def export_model(
    model: nn.Module,
    out_path: str | os.PathLike,
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
) -> ExportReport:
    """Export ``model`` to ``out_path`` and keep the file only if it passes checker and parity.

    ``inputs``: a real batch (normalised, like training) for the parity check; without it a seeded
    random batch of the model's input shape is used. Raises ParityError (a UserError) with the
    figures when the check fails; ``out_path`` is then left as it was.
    """
    dest = Path(out_path)
    if not dest.resolve().parent.is_dir():  # before minutes of work, not after
        raise UserError(f"folder {dest.parent} does not exist: create it first")
    meta = copy.deepcopy(metadata) if metadata is not None else ExportMetadata()  # the caller's is not changed
    inputs, inputs_from_data, shape = prepare_inputs(model, meta, inputs, inputs_from_data, input_shape)
    if measure_cost:
        fill_cost(model, meta, shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # batch 2: a batch of 1 lets an exporter treat the batch dimension as a constant
    sample = (inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *[1] * (inputs.dim() - 1))).to(device)
    graph = export_graph(model, sample, opset=opset, exporter=exporter, input_name=meta.input_name,
                         output_name=meta.output_name, log=log)
    meta.exporter, meta.opset = graph.exporter, graph.opset
    write_metadata(graph.proto, meta)

    with atomic_output(dest) as tmp:
        onnx.save(graph.proto, str(tmp))
        parity = check_parity(tmp, model, inputs, atol=atol, from_data=inputs_from_data)
        report = ExportReport(str(dest), 0, graph, parity, meta, notes=list(graph.notes))
        if simplify:
            _simplify_verified(report, graph.proto, tmp, model, inputs, atol, inputs_from_data, log)
    report.bytes = dest.stat().st_size
    report.nodes = len(onnx.load(str(dest), load_external_data=False).graph.node)
    return report


def _simplify_verified(report: ExportReport, proto, tmp: Path, model, inputs, atol, from_data, log) -> None:
    """Replace the verified temporary file by its simplified version only if that passes too."""
    simplified = simplify_graph(proto)
    report.simplified = simplified
    candidate = tmp.with_name(tmp.name + ".simplified")
    try:
        onnx.save(simplified.proto, str(candidate))
        report.simplified_parity = check_parity(
            candidate, model, inputs, atol=atol, from_data=from_data, raise_on_failure=False
        )
        report.simplify_kept = report.simplified_parity.passed
        reason = "failed parity"
        if report.simplify_kept:
            os.replace(candidate, tmp)
    except UserError as err:  # the checker rejected it
        report.simplify_kept, reason = False, f"was rejected ({err})"
    finally:
        candidate.unlink(missing_ok=True)
    if not report.simplify_kept:
        note = f"the {simplified.tool}-simplified graph {reason}; keeping the plain export"
        report.notes.append(note)
        if log:
            log(f"warning: {note}")


def quantize_model(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration: Iterable,
    test_batches: Iterable,
    *,
    margin: float = DEFAULT_MARGIN_POINTS,
    settings: QuantizeSettings | None = None,
    val_batches: Iterable | None = None,
    keep_anyway: bool = False,
    max_float: int | None = None,
    ranking_samples: int = DEFAULT_RANKING_SAMPLES,
    log: Log | None = stderr_log,
) -> Int8Comparison:
    """int8 QDQ file from a verified fp32 file: checked, compared on the test batches, then kept.

    ``calibration``: batches of training images; ``test_batches``: labelled batches (Batch or (x, y)).
    With ``val_batches`` (labelled validation batches) the int8 model is under accuracy control
    (:mod:`export.int8_control`): layers fall back to float until the validation drop fits
    ``margin``, and a model that cannot fit is not written unless ``keep_anyway``
    (``comparison.control`` says which; ``comparison.written``). Without them it is always kept,
    and flagged when the test drop exceeds the margin.
    """
    calibration = list(calibration)
    if not calibration:
        raise UserError("int8 quantization needs calibration images: pass --data SPEC")
    if val_batches is None:
        with atomic_output(int8_path) as tmp:
            result = quantize_int8(fp32_path, tmp, calibration, settings=settings)
            run_checker(tmp)
            comparison = compare_int8(fp32_path, result, test_batches, margin=margin)
        comparison.path = str(int8_path)
        return comparison
    with Int8Quantizer(fp32_path, calibration, settings=settings) as quantizer, \
            tempfile.TemporaryDirectory(prefix="kdcompress-int8-control-") as work:
        control, chosen = control_int8(quantizer, work, val_batches, margin=margin, max_float=max_float,
                                       ranking_samples=ranking_samples, log=log)
        run_checker(chosen.path)
        comparison = compare_int8(fp32_path, chosen, test_batches, margin=margin)
        comparison.control = control
        control.kept_anyway = not control.met_margin and keep_anyway
        if control.met_margin or keep_anyway:
            with atomic_output(int8_path) as tmp:
                shutil.copyfile(chosen.path, tmp)
            control.written = True
            comparison.path = str(int8_path)
        else:
            comparison.path = ""
    return comparison
