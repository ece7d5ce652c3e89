"""`kdcompress device-bench MODEL --adb [--serial S] --runner PATH [--runner-kind K --runs N --threads N --json F]`."""

from __future__ import annotations

import click

from compressor.atomic import check_writable
from compressor.errors import UserError
from recipes.cli._options import LazyChoice


def _kinds() -> list[str]:
    from export.device_kit import RUNNER_KINDS

    return ["auto", *RUNNER_KINDS]


@click.command("device-bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--adb", "use_adb", is_flag=True, help="reach the Android device over adb (the one transport so far)")
@click.option("--serial", default=None, help="the device's serial (adb devices) when several are attached")
@click.option("--runner", required=True, type=click.Path(dir_okay=False),
              help="the benchmark binary built for the device: onnxruntime_perf_test, executor_runner or benchmark_model")
@click.option("--runner-kind", default="auto", show_default=True,
              type=LazyChoice(_kinds),
              help="which tool --runner is (auto: from its file name)")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1), help="timed runs on the device")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="the runner's CPU threads")
@click.option("--push", "extra", multiple=True, type=click.Path(dir_okay=False),
              help="also push this file beside the runner (e.g. libonnxruntime.so); repeatable")
@click.option("--timeout", default=1800.0, show_default=True, type=click.FloatRange(min=1), help="seconds for the run")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="also write the results as JSON")
def command(model: str, use_adb: bool, serial: str | None, runner: str, runner_kind: str, runs: int, threads: int,
            extra: tuple[str, ...], timeout: float, json_path: str | None) -> None:
    """Time MODEL on an Android device with the runtime's own benchmark binary (pushed, run, removed)."""
    from export.device_kit import device_bench, to_report

    if not use_adb:
        raise UserError("device-bench needs a way to reach the device: pass --adb")
    if json_path:
        check_writable(json_path)
    run = device_bench(model, runner, kind=runner_kind, serial=serial, runs=runs, threads=threads, extra_files=extra,
                       timeout=timeout)
    report = to_report(run)
    click.echo(f"{run.device_model} ({run.serial}); {run.kind.name}: {' '.join(run.command)}; times in ms per batch")
    click.echo(report.table())
    if json_path:
        report.write_json(json_path)
        click.echo(f"json: {json_path}")
