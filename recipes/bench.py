"""Time an ONNX file or a checkpoint: the library call behind ``kdcompress bench``.

An ONNX file is timed in onnxruntime beside the eager model of the checkpoint its metadata
records; a checkpoint is first exported to a temporary, verified ONNX file. Below the table, the
multiply-adds per second each back end achieves at batch 1, beside the CPU's nominal peak
(:mod:`export.peak`). The CLI only parses its options, calls :func:`bench_model` and prints.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from compressor.errors import UserError
from export.latency import BenchmarkReport, Timing

Echo = Callable[[str], None]
CHECKPOINT_LOADER = "compressor.checkpoint:load_model"  # how the start-up child reads a checkpoint


@dataclass
class BenchRun:
    """What one bench call measured: the timings, and the compute lines printed below the table."""

    result: BenchmarkReport
    compute: list[str] = field(default_factory=list)


def bench_model(
    model: str,
    *,
    batch: int = 32,
    threads: Sequence[int] | None = None,
    timing: Timing = Timing(),
    device: str = "auto",
    eager: bool = True,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust: bool = False,
    startup: bool = True,
    echo: Echo = print,
    log: Echo | None = None,
) -> BenchRun:
    """Time ``model`` (an ONNX file or a checkpoint) at batch 1 and ``batch``, for each thread count.

    ``echo`` gets the line that says a checkpoint was exported for timing; ``log`` the exporter's notes.
    ``startup``: also each runtime's load time, first inference and peak RSS, each in its own process.
    """
    from export.io import kind_of
    from recipes.deploy import load_for_export
    from export.latency import benchmark, fixed_batch
    from export.metadata import read_metadata
    from export.runtime import available_providers

    provider, torch_device = _device(device, available_providers())
    shape = input_shape
    kind = kind_of(model)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kdcompress-bench-") as tmp:
        torch_model = None
        batches = [1, batch]
        if kind == "onnx":
            fixed = fixed_batch(model)  # also refuses a model whose input is not one float image batch
            if fixed is not None:  # onnxruntime refuses any other batch size
                batches = [fixed]
                if fixed != batch:
                    notes.append(f"the model's input batch size is fixed at {fixed}: only that batch is timed")
            meta = read_metadata(model)
            label = "int8" if meta.quantization else Path(model).name
            onnx_models = {label: model}
            if eager:
                torch_model, why = _recorded_source(meta, trust)
                if why:
                    notes.append(why)
        else:
            from export.pipeline import export_model

            torch_model, meta = load_for_export(model, arch=arch, trust=trust)
            if shape is None and meta.input_size is None:
                raise UserError(f"{model} does not record its input size: give --input CxHxW")
            onnx_path = Path(tmp) / "model.onnx"
            report = export_model(torch_model, onnx_path, metadata=meta, input_shape=shape, measure_cost=False, log=log)
            echo(f"exported for timing ({report.exporter} exporter); {report.parity.summary()}")
            onnx_models = {"onnx fp32": str(onnx_path)}
            if not eager:
                torch_model = None
        result = benchmark(onnx_models, torch_model=torch_model, input_shape=shape, batches=batches,
                           threads=threads, timing=timing, provider=provider, torch_device=torch_device)
        compute = _compute_lines(result, meta.flops if kind == "onnx" else None, torch_model, shape, onnx_models)
        if startup:
            from export.latency import onnx_input_shape, thread_counts
            from export.load_metrics import bench_runtimes, startup_of

            checkpoint = None if torch_model is None else (meta.source_checkpoint if kind == "onnx" else model)
            runtimes = bench_runtimes(onnx_models, checkpoint, provider=provider, torch_device=torch_device, arch=arch,
                                      trust=trust, loader=CHECKPOINT_LOADER, preload=("compressor.models",))
            result.startup, failed = startup_of(runtimes, shape or onnx_input_shape(next(iter(onnx_models.values()))),
                                                threads=thread_counts(threads)[0], batch=min(batches))
            notes += failed
    result.notes += notes
    return BenchRun(result, compute)


def _device(choice: str, providers: list[str]) -> tuple[str, str]:
    """(onnxruntime provider, torch device) so both back ends run on the same hardware."""
    has_cuda = "CUDAExecutionProvider" in providers
    if choice == "cuda" and not has_cuda:
        raise UserError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    if choice == "cuda" or (choice == "auto" and has_cuda):
        return "CUDAExecutionProvider", "cuda"
    return "CPUExecutionProvider", "cpu"


def _recorded_source(meta, trust: bool):
    """The eager model an ONNX file was exported from, if its metadata names a checkpoint that exists."""
    from recipes.deploy import load_for_export

    source = meta.source_checkpoint
    if not source:
        return None, "no eager comparison: the ONNX file records no source checkpoint"
    if not Path(source).exists():
        return None, f"no eager comparison: the recorded source checkpoint {source} does not exist here"
    model, _ = load_for_export(source, trust=trust)
    return model, None


def _compute_lines(result, recorded_flops: int | None, torch_model, shape, onnx_models: dict[str, str]) -> list[str]:
    """Achieved multiply-adds/s of each back end at batch 1 beside the CPU's nominal peak; also
    stored in ``result.compute`` for --json. FLOPs: the ONNX file's record, else fvcore on the model."""
    from compressor.cost import format_flops, measure
    from export.latency import onnx_input_shape
    from export.peak import achieved, detect_peak

    macs = recorded_flops
    if macs is None and torch_model is not None:
        probe = shape or onnx_input_shape(next(iter(onnx_models.values())))
        macs = measure(torch_model, probe).flops
    if not macs:
        return ["compute: no FLOPs (the ONNX file records none and there is no source model to count)"]
    peak = detect_peak(result.machine["cores"])
    rows = achieved(result.results, macs, peak)
    result.compute = {"macs_per_image": macs, "peak": None if peak is None else {**peak.__dict__,
                      "macs_per_s_all_cores": peak.macs_per_s(peak.cores)}, "rows": [r.to_dict() for r in rows]}
    lines = [f"compute at batch 1: {format_flops(macs)} per image (1 FLOP = 1 multiply-add, fvcore); "
             + (f"nominal peak {peak.describe()}" if peak else "peak unknown (no clock in /proc/cpuinfo)")]
    for r in rows:
        share = f", {100 * r.share_of_peak:.1f}% of the {r.threads}-thread peak" if r.share_of_peak else ""
        int8 = " (int8 ops: the fp32 peak is a lower bar)" if "int8" in r.label else ""
        lines.append(f"  {r.label} ({r.backend}, {r.threads} thr): {r.macs_per_s / 1e9:.2f} G multiply-adds/s{share}{int8}")
    return lines
