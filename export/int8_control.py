"""int8 with accuracy control: where the int8 model loses more than the margin, the layers it hurts
most stay in float, one at a time, until the loss fits.

Method (after NNCF's ``quantize_with_accuracy_control`` and onnxruntime's ``nodes_to_exclude``):
  1. pre-process and calibrate once (:class:`export.quantize.Int8Quantizer`), quantize every op;
  2. top-1 of fp32 and int8 on the **validation** split (the split that makes choices; the test
     split is only reported afterwards). Drop = fp32 - int8 in points; within ``margin``: done;
  3. rank the int8 layers (ops that compute: Conv, Gemm, MatMul, Add, pools...; not reshapes, which
     lose nothing): for each, quantize everything except that layer and measure the logits' error
     against fp32 on ``ranking_samples`` validation images (squared error over the fp32 logits'
     energy). Sensitivity = the full int8 model's error minus that: what keeping the layer float
     removes. Accuracy would rank too coarsely (one image = 0.7 points on digits' 144);
  4. leave the most sensitive layer float, then the two most sensitive, ... re-measuring validation
     top-1 each time, until the drop fits. The margin is missed when it needs more than
     ``max_float`` float layers or every layer (a file with no int8 layer is not an int8 model);
     the best model tried is then what ``--keep-int8-anyway`` writes;
  5. the chosen model is timed against fp32 (batch 1, one thread: the phone setting), since a
     graph cut into int8 and float pieces can lose the speed int8 was for.
Cost: one quantization and one validation pass per layer ranked and per fallback step, and none
of it when the fully quantized model already fits.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from compressor.errors import UserError
from export.quantize import Int8Quantizer, QuantizeResult, quantized_layers
from export.runtime import make_session, run_logits

DEFAULT_RANKING_SAMPLES = 300
MISSED_MARGIN_STATUS = 3  # exit status: everything else was written, the int8 file was not (it missed the margin)
_EPS = 1e-9  # accuracies are ratios of counts: 95.0 - 94.0 may come out as 1.0000000000000142

Log = Callable[[str], None]


@dataclass
class LayerSensitivity:
    name: str
    op_type: str
    error_without: float  # normalised logit error against fp32 with this layer alone in float
    sensitivity: float  # the full int8 model's error minus error_without


@dataclass
class FallbackStep:
    float_layers: int
    val_accuracy: float
    drop: float


@dataclass
class Int8Control:
    """What accuracy control measured and decided, on the validation split."""

    margin: float
    val_samples: int
    ranking_samples: int
    fp32_val_accuracy: float
    full_int8_val_accuracy: float
    val_accuracy: float  # of the chosen model
    layers: int  # int8 layers of the fully quantized model
    float_layers: list[str] = field(default_factory=list)  # left in float, most sensitive first
    met_margin: bool = True
    max_float: int | None = None
    ranking: list[LayerSensitivity] = field(default_factory=list)
    steps: list[FallbackStep] = field(default_factory=list)
    latency: dict | None = None  # fp32_ms, int8_ms (p50 at batch 1, 1 thread), speedup
    written: bool = False
    kept_anyway: bool = False

    @property
    def drop(self) -> float:
        return self.fp32_val_accuracy - self.val_accuracy

    def describe_float(self) -> str:
        if not self.float_layers:
            return f"all {self.layers} layers int8"
        return f"{len(self.float_layers)} of {self.layers} layers left float"

    def summary_lines(self) -> list[str]:
        full_drop = self.fp32_val_accuracy - self.full_int8_val_accuracy
        lines = [f"int8 accuracy control on {self.val_samples} validation images (margin {self.margin:.2f} points): "
                 f"fp32 {self.fp32_val_accuracy:.2f}%, all {self.layers} layers int8 {self.full_int8_val_accuracy:.2f}% "
                 f"(drop {full_drop:+.2f})"]
        if self.ranking:
            top = ", ".join(f"{r.name} ({r.op_type}) {r.sensitivity:.3g}" for r in self.ranking[:3])
            lines.append(f"  most sensitive of {len(self.ranking)} layers (logit error removed when left float, "
                         f"{self.ranking_samples} images): {top}")
        if self.float_layers:
            verdict = "meets the margin" if self.met_margin else "MISSES the margin"
            lines.append(f"  left float: {', '.join(self.float_layers)} ({self.describe_float()}) -> "
                         f"{self.val_accuracy:.2f}% (drop {self.drop:+.2f}): {verdict}")
        elif not self.met_margin:
            allowed = "no fallback allowed (--int8-max-float 0)" if self.max_float == 0 else "only one int8 layer"
            lines.append(f"  {allowed}: MISSES the margin")
        if self.latency:
            lat = self.latency
            lines.append(f"  speed at batch 1, 1 thread (p50): fp32 {lat['fp32_ms']:.3f} ms, int8 "
                         f"({self.describe_float()}) {lat['int8_ms']:.3f} ms ({lat['speedup']:.2f}x)")
        if not self.met_margin:
            lines.append("  " + self.missed_line())
        return lines

    def missed_line(self) -> str:
        """The one line that goes with exit status MISSED_MARGIN_STATUS (or with --keep-int8-anyway)."""
        what = (f"kept anyway (--keep-int8-anyway): it loses" if self.written else
                f"int8 file not written (exit status {MISSED_MARGIN_STATUS}; the fp32 model and the rest were): "
                "the best int8 model loses")
        return (f"{what} {self.drop:.2f} top-1 points on the validation split with {self.describe_float()}, "
                f"more than --int8-margin {self.margin:.2f}")

    def to_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop,
                "verdict": "meets the margin" if self.met_margin else self.missed_line()}


def labelled_arrays(batches: Iterable) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x float32 NCHW, y int) per batch, from Batch objects or (x, y) pairs, read once."""
    out = []
    for batch in batches:
        x, y = (batch.x, batch.y) if hasattr(batch, "x") else batch
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        y = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        out.append((np.ascontiguousarray(x, dtype=np.float32), y))
    if not out or sum(len(y) for _, y in out) == 0:
        raise UserError("int8 accuracy control needs validation images: the data's validation split is empty")
    return out


def logits_of(path: str | os.PathLike, arrays: Sequence[np.ndarray]) -> np.ndarray:
    session = make_session(path)
    return np.concatenate([run_logits(session, x) for x in arrays])


def logit_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Squared error of the logits over the reference's energy (0: identical; scale-free)."""
    ref = reference.astype(np.float64)
    return float(np.sum((candidate.astype(np.float64) - ref) ** 2) / max(np.sum(ref ** 2), 1e-30))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


def _ranking_subset(arrays: list[np.ndarray], n: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded subset of ``n`` validation images (all of them when there are fewer), in batches of 256."""
    stacked = np.concatenate(arrays)
    if len(stacked) > n:
        stacked = stacked[np.sort(np.random.default_rng(seed).choice(len(stacked), n, replace=False))]
    return [stacked[i:i + 256] for i in range(0, len(stacked), 256)]


def rank_layers(quantizer: Int8Quantizer, workdir: Path, layers: Sequence[tuple[str, str]], arrays: list[np.ndarray],
                reference: np.ndarray, full_error: float) -> list[LayerSensitivity]:
    """Each layer's sensitivity (see the module doc), most sensitive first; ties keep graph order."""
    ranking = []
    probe = workdir / "ranking.onnx"
    for name, op_type in layers:
        quantizer.quantize(probe, exclude=[name])
        error = logit_error(reference, logits_of(probe, arrays))
        ranking.append(LayerSensitivity(name, op_type, error, full_error - error))
    probe.unlink(missing_ok=True)
    return sorted(ranking, key=lambda r: -r.sensitivity)


def control_int8(
    quantizer: Int8Quantizer,
    workdir: str | os.PathLike,
    val_batches: Iterable,
    *,
    margin: float,
    max_float: int | None = None,
    ranking_samples: int = DEFAULT_RANKING_SAMPLES,
    time_it: bool = True,
    log: Log | None = None,
) -> tuple[Int8Control, QuantizeResult]:
    """Quantize with fallback until the validation drop fits ``margin`` (see the module doc).

    Returns the decision and the chosen file (inside ``workdir``): the first model that fits, or,
    when none does, the one with the smallest drop (fewest float layers on a tie), for the caller
    to keep or not. ``max_float``: the most layers allowed in float (None: all but one).
    """
    if margin < 0:
        raise UserError(f"--int8-margin must be >= 0 points, got {margin}")
    if max_float is not None and max_float < 0:
        raise UserError(f"--int8-max-float must be >= 0 layers, got {max_float}")
    workdir = Path(workdir)
    val = labelled_arrays(val_batches)
    xs, labels = [x for x, _ in val], np.concatenate([y for _, y in val])
    fp32_logits = logits_of(quantizer.fp32_path, xs)
    fp32_acc = top1(fp32_logits, labels)
    chosen = quantizer.quantize(workdir / "int8.onnx")
    acc = top1(logits_of(chosen.path, xs), labels)
    layers = quantized_layers(chosen.path)
    control = Int8Control(margin=margin, val_samples=int(len(labels)), ranking_samples=0, fp32_val_accuracy=fp32_acc,
                          full_int8_val_accuracy=acc, val_accuracy=acc, layers=len(layers), max_float=max_float,
                          steps=[FallbackStep(0, acc, fp32_acc - acc)])
    if fp32_acc - acc > margin + _EPS:
        limit = len(layers) - 1 if max_float is None else min(max_float, len(layers) - 1)
        control.met_margin = False
        if log:
            log(f"int8 loses {fp32_acc - acc:.2f} points on the validation split (margin {margin:.2f}): "
                f"ranking {len(layers)} layers by sensitivity" if limit > 0 else
                f"int8 loses {fp32_acc - acc:.2f} points on the validation split (margin {margin:.2f}); no fallback allowed")
        if limit > 0:
            subset = _ranking_subset(xs, ranking_samples)
            control.ranking_samples = int(sum(len(x) for x in subset))
            reference = logits_of(quantizer.fp32_path, subset)
            full_error = logit_error(reference, logits_of(chosen.path, subset))
            control.ranking = rank_layers(quantizer, workdir, layers, subset, reference, full_error)
            order = [r.name for r in control.ranking]
            best, best_acc = chosen, acc
            for k in range(1, limit + 1):
                candidate = quantizer.quantize(workdir / f"int8.fallback{k}.onnx", exclude=order[:k])
                k_acc = top1(logits_of(candidate.path, xs), labels)
                control.steps.append(FallbackStep(k, k_acc, fp32_acc - k_acc))
                if log:
                    log(f"  {k} layer(s) float (+{order[k - 1]}): validation top-1 {k_acc:.2f}% (drop {fp32_acc - k_acc:+.2f})")
                if k_acc > best_acc + _EPS:
                    Path(best.path).unlink(missing_ok=True)
                    best, best_acc = candidate, k_acc
                else:
                    Path(candidate.path).unlink(missing_ok=True)
                if fp32_acc - k_acc <= margin + _EPS:
                    control.met_margin = True
                    break
            chosen, control.val_accuracy = best, best_acc
            control.float_layers = list(best.float_layers)
    if time_it:
        control.latency = _speed(quantizer.fp32_path, chosen.path)
    return control, chosen


def _speed(fp32_path: str | os.PathLike, int8_path: str | os.PathLike) -> dict:
    """p50 latency of both files at batch 1 and one thread, alternated so machine load hits both alike."""
    from export.latency import Timing, bench_onnx

    timing = Timing(warmup=5, min_runs=30, min_time=0.2)
    fp32, int8 = [], []
    for _ in range(2):
        fp32.append(bench_onnx(fp32_path, batch=1, threads=1, timing=timing, label="fp32").p50_ms)
        int8.append(bench_onnx(int8_path, batch=1, threads=1, timing=timing, label="int8").p50_ms)
    fp32_ms, int8_ms = min(fp32), min(int8)
    return {"batch": 1, "threads": 1, "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms}
