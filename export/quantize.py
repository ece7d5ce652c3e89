"""int8 static quantization of an exported fp32 ONNX file (onnxruntime, QDQ, per-channel weights).

Method: the fp32 graph is pre-processed (``quant_pre_process``: symbolic shape inference and
onnxruntime's basic graph optimisation, which folds BatchNorm into the convolutions so one scale
covers conv+BN), then ``quantize_static`` inserts QuantizeLinear/DequantizeLinear pairs in QDQ
format, with per-output-channel weight scales and per-tensor activation scales calibrated (MinMax by
default) on a few hundred seeded training images. onnxruntime fuses each DQ -> Conv -> Q into an
integer convolution at load time.

Types: unsigned 8-bit activations with signed 8-bit weights (U8S8) by default. On x86 CPUs
without VNNI (this machine: AVX2 only) onnxruntime's S8S8 kernels are slower than fp32 (ResNet-20:
0.72x), while U8S8 runs 1.6x faster than fp32; U8S8's 16-bit intermediate sums can saturate on such
CPUs, so weights are quantized to 7 bits by default (``reduce_range=True``, onnxruntime's advice
for non-VNNI x86; same speed; a digits CNN lost 0.84 points at 8 bits and none at 7). The same
file then behaves the same on a phone's ARM kernels and on any x86 server, and the int8 accuracy
check that follows every quantization measures what is shipped.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from compressor.errors import UserError
from export.metadata import read_metadata, write_metadata
from export.runtime import make_session, run_logits

DEFAULT_CALIBRATION_SAMPLES = 300
DEFAULT_MARGIN_POINTS = 1.0  # accuracy points int8 may lose before it is flagged

_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# ops that only move int8 values (same scale in and out): nothing to recover by leaving them float
_LOSSLESS_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Gather", "Slice",
                           "Split", "Identity", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"})
_HAS_CALIBRATION_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _as_numpy(batch) -> np.ndarray:
    x = batch.x if hasattr(batch, "x") else batch
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def split_batches(x: torch.Tensor | np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """Cut one stack of calibration images into batches the reader hands out one by one."""
    array = _as_numpy(x)
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def equal_batches(batches: Iterable, max_batch: int = 32) -> list[np.ndarray]:
    """Re-cut the samples into batches of one size (the largest divisor of the count <= ``max_batch``).

    onnxruntime's histogram calibrators (entropy, percentile) stack per-batch outputs and fail on a
    short last batch; equal batches keep every sample without padding.
    """
    arrays = [_as_numpy(b) for b in batches]
    if not arrays:
        return []
    stacked = np.concatenate(arrays)
    n = len(stacked)
    size = next(b for b in range(min(max_batch, n), 0, -1) if n % b == 0)
    return [stacked[i : i + size] for i in range(0, n, size)]


class BatchCalibrationReader(CalibrationDataReader):
    """Feeds the given samples (tensors, arrays or Batch objects) to the calibrator in equal batches."""

    def __init__(self, batches: Iterable, input_name: str) -> None:
        self.batches = equal_batches(batches)
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


@dataclass
class QuantizeSettings:
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    calibration_method: str = "minmax"
    reduce_range: bool = True  # 7-bit weights: no U8S8 saturation on AVX2 CPUs; accuracy is checked anyway
    preprocess: bool = True

    def describe(self) -> str:
        a, w = ("U" if self.activation_type == "uint8" else "S"), ("U" if self.weight_type == "uint8" else "S")
        return (
            f"int8 static QDQ, {'per-channel' if self.per_channel else 'per-tensor'} weights, "
            f"{a}8{w}8, {self.calibration_method} calibration"
            + (", 7-bit weights (reduce_range)" if self.reduce_range else "")
        )


@dataclass
class QuantizeResult:
    path: str
    settings: QuantizeSettings
    calibration_samples: int
    fp32_bytes: int
    int8_bytes: int
    float_layers: list[str] = field(default_factory=list)  # nodes left in float (accuracy control)

    def to_dict(self) -> dict:
        return {**asdict(self), "settings": asdict(self.settings), "description": self.settings.describe()}


class Int8Quantizer:
    """One fp32 file, pre-processed and calibrated once, quantized as often as asked with any nodes
    left in float (onnxruntime's ``nodes_to_exclude``): what accuracy control needs, which tries many
    fallbacks of the same model. Use as a context manager (it owns a temporary folder).

    The calibration ranges are computed on the first quantization and reused by the later ones
    through onnxruntime's ``calibration_cache_path`` (onnxruntime >= 1.32; an older one calibrates
    again each time, same ranges, slower), so every fallback is measured against the same scales.
    """

    def __init__(self, fp32_path: str | os.PathLike, calibration: Iterable, *,
                 settings: QuantizeSettings | None = None) -> None:
        self.settings = settings or QuantizeSettings()
        for value, allowed in ((self.settings.activation_type, _QUANT_TYPES), (self.settings.weight_type, _QUANT_TYPES),
                               (self.settings.calibration_method, _CALIBRATION_METHODS)):
            if value not in allowed:
                raise UserError(f"unknown quantization setting {value!r}: choose {', '.join(allowed)}")
        self.batches = [_as_numpy(b) for b in calibration]
        self.samples = sum(len(b) for b in self.batches)
        if self.samples == 0:
            raise UserError("int8 quantization needs calibration images: pass --data SPEC")
        self.fp32_path = Path(fp32_path)
        fp32 = onnx.load(str(fp32_path))
        self.input_name = fp32.graph.input[0].name
        self.meta = read_metadata(fp32)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.source = self.fp32_path

    def __enter__(self) -> "Int8Quantizer":
        self._tmp = tempfile.TemporaryDirectory(prefix="kdcompress-int8-")
        if self.settings.preprocess:
            self.source = Path(self._tmp.name) / "preprocessed.onnx"
            with _quiet_ort():
                quant_pre_process(str(self.fp32_path), str(self.source), skip_symbolic_shape=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def quantize(self, out_path: str | os.PathLike, exclude: Sequence[str] = ()) -> QuantizeResult:
        """Write the QDQ model to ``out_path`` with the nodes named in ``exclude`` left in float."""
        if self._tmp is None:
            raise RuntimeError("Int8Quantizer.quantize outside its with-block")
        settings = self.settings
        options = {}
        if _HAS_CALIBRATION_CACHE:
            options["calibration_cache_path"] = str(Path(self._tmp.name) / "calibration.json")
        with _quiet_ort():
            quantize_static(
                str(self.source),
                str(out_path),
                BatchCalibrationReader(self.batches, self.input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=getattr(QuantType, _QUANT_TYPES[settings.activation_type]),
                weight_type=getattr(QuantType, _QUANT_TYPES[settings.weight_type]),
                calibrate_method=getattr(CalibrationMethod, _CALIBRATION_METHODS[settings.calibration_method]),
                nodes_to_exclude=list(exclude),
                **options,
            )
        quantized = onnx.load(str(out_path))
        keep_float(quantized, exclude)
        meta = copy.deepcopy(self.meta)
        meta.quantization = settings.describe() + (f"; {len(exclude)} layer(s) left float" if exclude else "")
        meta.extra["calibration_samples"] = self.samples
        if exclude:
            meta.extra["float_layers"] = list(exclude)
        write_metadata(quantized, meta)
        onnx.save(quantized, str(out_path))
        return QuantizeResult(str(out_path), settings, self.samples, os.path.getsize(self.fp32_path),
                              os.path.getsize(out_path), list(exclude))


def keep_float(proto: onnx.ModelProto, names: Iterable[str]) -> int:
    """Make the named nodes really compute in float in onnxruntime; returns how many Q cuts it made.

    ``nodes_to_exclude`` only leaves a node's own weights float: its input still comes from a
    DequantizeLinear and its output still feeds a QuantizeLinear when its neighbours are int8, and
    onnxruntime's graph optimiser fuses any DQ -> op -> Q group back into an int8 kernel at load
    time, quantizing a float Conv/Gemm weight per tensor on the way (its WeightBiasQuantization
    pass) - worse than what was excluded. So the QuantizeLinear after each named node (reached
    through Relu/Clip without branches, as that pass looks) is cut out with its DequantizeLinears,
    and their readers take the float tensor: the node's consumers read it in float.
    """
    graph = proto.graph
    graph_outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in graph.node}
    cuts = 0
    for name in names:
        node = by_name.get(name)
        if node is None:
            continue
        for tensor in list(node.output):
            tensor, consumers = _through_activations(graph, tensor, graph_outputs)
            for q in [n for n in consumers if n.op_type == "QuantizeLinear"]:
                cuts += _cut_quantize(graph, q, tensor, graph_outputs)
    return cuts


def _through_activations(graph, tensor: str, graph_outputs: set[str]) -> tuple[str, list]:
    """(tensor, its consumers) after following a branch-free chain of Relu/Clip from ``tensor``:
    where onnxruntime's QDQ fusions look for the QuantizeLinear that closes an int8 group."""
    consumers = [n for n in graph.node if tensor in n.input]
    while len(consumers) == 1 and consumers[0].op_type in ("Relu", "Clip") and tensor not in graph_outputs:
        tensor = consumers[0].output[0]
        consumers = [n for n in graph.node if tensor in n.input]
    return tensor, consumers


def _cut_quantize(graph, q, tensor: str, graph_outputs: set[str]) -> int:
    """Remove ``q`` (fed by float ``tensor``) and its DequantizeLinears; their readers read ``tensor``."""
    readers = [n for n in graph.node if q.output[0] in n.input]
    if q.output[0] in graph_outputs or any(n.op_type != "DequantizeLinear" for n in readers):
        return 0
    dq_outputs = [dq.output[0] for dq in readers]
    kept_name = next((o for o in dq_outputs if o in graph_outputs), tensor)  # a graph output keeps its name
    if kept_name != tensor:
        for n in graph.node:
            n.output[:] = [kept_name if o == tensor else o for o in n.output]
    for n in graph.node:
        n.input[:] = [kept_name if i in dq_outputs or i == tensor else i for i in n.input]
    for dead in [q, *readers]:
        graph.node.remove(dead)
    return 1


def quantized_layers(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, op type) of the nodes a QDQ file computes in int8: fed by a DequantizeLinear and
    closed by a QuantizeLinear (the group onnxruntime fuses into an int8 kernel), less the ones
    that only move data (a reshape or max-pool of int8 values loses nothing, so leaving it in
    float cannot recover accuracy). In graph order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    graph_outputs = {o.name for o in graph.output}
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    layers = []
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in _LOSSLESS_OPS:
            continue
        if not any(i in dequantized for i in n.input if i):
            continue
        if any(c.op_type == "QuantizeLinear" for out in n.output
               for c in _through_activations(graph, out, graph_outputs)[1]):
            layers.append((n.name, n.op_type))
    return layers


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: Iterable,
    *,
    settings: QuantizeSettings | None = None,
    exclude: Sequence[str] = (),
) -> QuantizeResult:
    """Write the int8 QDQ model of ``fp32_path`` to ``out_path`` (the caller makes it atomic).

    ``calibration``: batches of normalised images (tensors, arrays or Batch objects). The fp32
    file's metadata is carried over, with ``quantization`` describing what was done. ``exclude``:
    node names (of the pre-processed graph, as :func:`quantized_layers` lists them) left in float.
    """
    with Int8Quantizer(fp32_path, calibration, settings=settings) as quantizer:
        return quantizer.quantize(out_path, exclude)


@contextlib.contextmanager
def _quiet_ort():
    """The quantization tools log every skipped node and print progress; keep that out of the output."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def onnx_predictions(path: str | os.PathLike, batches: Iterable, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true label) over labelled batches: Batch objects or (x, y) pairs."""
    session = make_session(path, threads=threads)
    preds, labels = [], []
    for batch in batches:
        x, y = (batch.x, batch.y) if hasattr(batch, "x") else batch
        preds.append(run_logits(session, _as_numpy(x)).argmax(1))
        labels.append(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    if not preds:
        raise UserError("no test samples to measure accuracy on")
    return np.concatenate(preds), np.concatenate(labels)


@dataclass
class Int8Comparison:
    """fp32 against int8 on the test split: the figures the report prints."""

    fp32_accuracy: float  # percent
    int8_accuracy: float
    agreement: float  # percent of test samples where both predict the same class
    test_samples: int
    margin: float  # accuracy points int8 may lose
    fp32_bytes: int
    int8_bytes: int
    calibration_samples: int
    settings: str
    path: str = ""  # empty when accuracy control did not write the file
    control: Any = None  # export.int8_control.Int8Control when the validation split held it to the margin

    @property
    def drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def flagged(self) -> bool:
        return self.drop > self.margin

    @property
    def written(self) -> bool:
        return bool(self.path)

    @property
    def missed_margin(self) -> bool:
        """Accuracy control could not fit the margin (the file is then written only if asked)."""
        return self.control is not None and not self.control.met_margin

    def summary_lines(self) -> list[str]:
        lines = list(self.control.summary_lines()) if self.control is not None else []
        name = self.path if self.written else "model (not written)"
        lines += [
            f"int8 {name} ({self.settings}, calibrated on {self.calibration_samples} training images)",
            f"  accuracy on {self.test_samples} test images: fp32 {self.fp32_accuracy:.2f}%  "
            f"int8 {self.int8_accuracy:.2f}%  (drop {self.drop:+.2f} points, margin {self.margin:.2f}); "
            f"same prediction on {self.agreement:.1f}%",
            f"  size: fp32 {self.fp32_bytes / 1e6:.2f} MB  int8 {self.int8_bytes / 1e6:.2f} MB "
            f"({self.fp32_bytes / max(self.int8_bytes, 1):.1f}x smaller)",
        ]
        if self.flagged and (self.control is None or self.written):
            at = len(lines) - 3
            lines[at:at] = [
                "!" * 72,
                f"!! WARNING: int8 model loses {self.drop:.2f} accuracy points on the test split (> margin "
                f"{self.margin:.2f}); try --calibration entropy, more calibration images, or ship fp32",
                "!" * 72,
            ]
        return lines

    def to_dict(self) -> dict:
        out = {**asdict(self), "drop": self.drop, "flagged": self.flagged, "written": self.written,
               "missed_margin": self.missed_margin}
        out["control"] = self.control.to_dict() if self.control is not None else None
        return out


def compare_int8(
    fp32_path: str | os.PathLike,
    int8: QuantizeResult,
    test_batches: Iterable,
    *,
    margin: float = DEFAULT_MARGIN_POINTS,
) -> Int8Comparison:
    """Accuracy of both files on the same labelled test batches, and the verdict against ``margin``."""
    test_batches = list(test_batches)
    fp_pred, labels = onnx_predictions(fp32_path, test_batches)
    q_pred, _ = onnx_predictions(int8.path, test_batches)
    return Int8Comparison(
        fp32_accuracy=100.0 * float(np.mean(fp_pred == labels)),
        int8_accuracy=100.0 * float(np.mean(q_pred == labels)),
        agreement=100.0 * float(np.mean(fp_pred == q_pred)),
        test_samples=int(len(labels)),
        margin=margin,
        fp32_bytes=int8.fp32_bytes,
        int8_bytes=int8.int8_bytes,
        calibration_samples=int8.calibration_samples,
        settings=int8.settings.describe(),
        path=str(int8.path),
    )
