"""`kdcompress export CHECKPOINT -o student.onnx [--target NAME ... --int8 --data SPEC --int8-margin P --opset N --simplify]`."""

from __future__ import annotations

import json

import click

from recipes.cli._options import (
    data_option,
    input_shape_option,
    int8_control_options,
    missed_margin_exit,
    parse_input_shape,
    target_option,
    trust_option,
)


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="the file to write; each target writes this name with its own suffix (student.onnx, student.pte, ...)")
@target_option
@data_option(what="real inputs for the parity check, calibration and test images for --int8; default: random "
                  "inputs, --int8 needs it")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=1), help="ONNX opset (17 or newer)")
@click.option("--exporter", default="auto", show_default=True, type=click.Choice(["auto", "dynamo", "torchscript"]),
              help="auto: dynamo, falling back to TorchScript (TorchScript first for opset 17)")
@click.option("--simplify", is_flag=True, help="simplify the graph with onnxslim (kept only if it passes parity too)")
@click.option("--atol", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="largest absolute logit difference allowed between onnxruntime and PyTorch")
@click.option("--int8", "int8", is_flag=True, help="also write an int8 static-quantized copy (QDQ, per-channel)")
@click.option("--int8-output", default=None, type=click.Path(dir_okay=False), help="default: OUTPUT with .int8.onnx")
@int8_control_options
@click.option("--calibration-samples", default=300, show_default=True, type=click.IntRange(min=1),
              help="training images used to calibrate the int8 ranges")
@click.option("--calibration", "calibration_method", default="minmax", show_default=True,
              type=click.Choice(["minmax", "entropy", "percentile"]))
@click.option("--arch", default=None, help="architecture of a checkpoint that does not record it")
@input_shape_option(default=None)
@click.option("--seed", default=0, show_default=True, type=int, help="seeds the parity and calibration samples")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="also write the results as JSON")
@trust_option
def command(checkpoint: str, output: str, targets: tuple[str, ...], data: str | None, opset: int, exporter: str, simplify: bool, atol: float,
            int8: bool, int8_output: str | None, int8_margin: float, keep_int8_anyway: bool, int8_max_float: int | None,
            calibration_samples: int,
            calibration_method: str, arch: str | None, input_shape: str | None, seed: int, report_path: str | None, trust: bool) -> None:
    """Export a checkpoint to ONNX (or other targets), verified against PyTorch before it is kept (optionally also int8)."""
    from export.io import atomic_output
    from recipes.deploy import export_checkpoint

    result = export_checkpoint(
        checkpoint, output, data=data, targets=targets, opset=opset, exporter=exporter, simplify=simplify, atol=atol, int8=int8,
        int8_output=int8_output, int8_margin=int8_margin, keep_int8_anyway=keep_int8_anyway, int8_max_float=int8_max_float,
        calibration_samples=calibration_samples,
        calibration_method=calibration_method, arch=arch, input_shape=parse_input_shape(input_shape) if input_shape else None,
        seed=seed, trust=trust, echo=click.echo, log=lambda m: click.echo(m, err=True))
    if report_path:
        with atomic_output(report_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        click.echo(f"report: {report_path}")
    missed = (result.get("int8") or {}).get("missed_line")
    if missed:
        missed_margin_exit(missed)
