"""`kdcompress bench MODEL.onnx|CHECKPOINT [--batch 32 --threads all,1 --runs N --json out.json]`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from compressor.atomic import check_writable
from compressor.errors import UserError
from recipes.cli._options import input_shape_option, parse_input_shape, trust_option


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="the chosen batch size; batch 1 is always measured too")
@click.option("--threads", default="all,1", show_default=True,
              help="intra-op thread counts, comma-separated; 'all' = every core this process may use")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1), help="minimum timed runs")
@click.option("--min-time", default=1.0, show_default=True, type=click.FloatRange(min=0), help="minimum timed seconds")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="untimed runs first")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto: CUDA where onnxruntime has its CUDA provider, else CPU (eager PyTorch runs on the same)")
@click.option("--eager/--no-eager", default=True, show_default=True,
              help="also time the PyTorch eager model (a checkpoint, or the one an ONNX file records)")
@click.option("--startup/--no-startup", default=True, show_default=True,
              help="also measure each runtime's load time, first inference and peak RSS, each in its own process")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="also write the results as JSON")
@click.option("--arch", default=None, help="architecture of a checkpoint that does not record it")
@input_shape_option(default=None)
@trust_option
def command(model: str, batch: int, threads: str, runs: int, min_time: float, warmup: int, device: str, eager: bool,
            startup: bool, json_path: str | None, arch: str | None, input_shape: str | None, trust: bool) -> None:
    """Time an ONNX file (onnxruntime) and the PyTorch eager model: mean, p50/p90/p99, min, throughput."""
    from export.io import kind_of, load_for_export
    from export.latency import Timing, benchmark, fixed_batch, thread_counts
    from export.metadata import read_metadata
    from export.runtime import available_providers

    if json_path:
        check_writable(json_path)  # before the timing, not after it
    timing = Timing(warmup=warmup, min_runs=runs, min_time=min_time, max_runs=max(runs, 100_000))
    counts = thread_counts(threads)
    provider, torch_device = _device(device, available_providers())
    shape = parse_input_shape(input_shape) if input_shape else None
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
            report = export_model(torch_model, onnx_path, metadata=meta, input_shape=shape, measure_cost=False,
                                  log=lambda m: click.echo(m, err=True))
            click.echo(f"exported for timing ({report.exporter} exporter); {report.parity.summary()}")
            onnx_models = {"onnx fp32": str(onnx_path)}
            if not eager:
                torch_model = None
        result = benchmark(onnx_models, torch_model=torch_model, input_shape=shape, batches=batches,
                           threads=counts, timing=timing, provider=provider, torch_device=torch_device)
        compute = _compute_lines(result, meta.flops if kind == "onnx" else None, torch_model, shape, onnx_models)
        if startup:
            from export.latency import onnx_input_shape
            from export.load_metrics import bench_runtimes, startup_of

            checkpoint = None if torch_model is None else (meta.source_checkpoint if kind == "onnx" else model)
            runtimes = bench_runtimes(onnx_models, checkpoint, provider=provider, torch_device=torch_device, arch=arch,
                                      trust=trust)
            result.startup, failed = startup_of(runtimes, shape or onnx_input_shape(next(iter(onnx_models.values()))),
                                                threads=counts[0], batch=min(batches))
            notes += failed
    result.notes += notes
    machine = result.machine
    click.echo(f"{machine['cpu']}, {machine['cores']} cores; onnxruntime {machine['onnxruntime']}, torch {machine['torch']}; "
               f"warm-up {warmup}, then >= {runs} runs and >= {min_time:g} s each; times in ms per batch")
    click.echo(result.table())
    for line in compute:
        click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}")
    if json_path:
        result.write_json(json_path)
        click.echo(f"json: {json_path}")


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
    from export.io import load_for_export

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
