"""`kdcompress bench MODEL.onnx|CHECKPOINT [--batch 32 --threads all,1 --runs N --json out.json --no-startup]`."""

from __future__ import annotations

import click

from compressor.atomic import check_writable
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
    from export.latency import Timing, thread_counts
    from recipes.bench import bench_model

    if json_path:
        check_writable(json_path)  # before the timing, not after it
    timing = Timing(warmup=warmup, min_runs=runs, min_time=min_time, max_runs=max(runs, 100_000))
    run = bench_model(model, batch=batch, threads=thread_counts(threads), timing=timing, device=device, eager=eager,
                      arch=arch, input_shape=parse_input_shape(input_shape) if input_shape else None, trust=trust, startup=startup,
                      echo=click.echo, log=lambda m: click.echo(m, err=True))
    result = run.result
    machine = result.machine
    click.echo(f"{machine['cpu']}, {machine['cores']} cores; onnxruntime {machine['onnxruntime']}, torch {machine['torch']}; "
               f"warm-up {warmup}, then >= {runs} runs and >= {min_time:g} s each; times in ms per batch")
    click.echo(result.table())
    for line in run.compute:
        click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}")
    if json_path:
        result.write_json(json_path)
        click.echo(f"json: {json_path}")
