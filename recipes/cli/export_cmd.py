"""`kdcompress export CHECKPOINT -o student.onnx [--int8 --data SPEC --opset N --simplify]`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compressor.errors import UserError
from recipes.cli._options import (
    input_shape_option,
    int8_control_options,
    missed_margin_exit,
    parse_input_shape,
    trust_option,
)


def _int8_path(out: Path) -> Path:
    return out.with_name(out.stem + ".int8" + (out.suffix or ".onnx"))


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="the ONNX file to write")
@click.option("--data", default=None, help="digits | fashion-mnist[:DIR] | mnist:DIR | cifar10:DIR | cifar100:DIR | imagefolder:DIR: real inputs for the "
              "parity check, calibration and test images for --int8 (default: random inputs; --int8 needs it)")
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
def command(checkpoint: str, output: str, data: str | None, opset: int, exporter: str, simplify: bool, atol: float,
            int8: bool, int8_output: str | None, int8_margin: float, keep_int8_anyway: bool, int8_max_float: int | None,
            calibration_samples: int, calibration_method: str, arch: str | None, input_shape: str | None, seed: int,
            report_path: str | None, trust: bool) -> None:
    """Export a checkpoint to ONNX, verified against PyTorch before it is kept (optionally also int8)."""
    from export.io import atomic_output, load_for_export
    from export.pipeline import export_model, quantize_model
    from export.quantize import QuantizeSettings

    if int8 and data is None:
        raise UserError("--int8 needs calibration and test images: pass --data SPEC (e.g. --data digits)")
    out = Path(output)
    int8_out = Path(int8_output) if int8_output else _int8_path(out)
    if int8 and int8_out.resolve() == out.resolve():
        raise UserError("--int8-output must differ from --output")
    for path in [out] + ([int8_out] if int8 else []):
        if not path.resolve().parent.is_dir():
            raise UserError(f"folder {path.parent} does not exist: create it first")
    model, meta = load_for_export(checkpoint, arch=arch, trust=trust)

    source, inputs = None, None
    if data is not None:
        from compressor.data import load_source

        source = load_source(data, seed=seed)
        _check_fits(meta, source, data)
        inputs = source.sample("test", 32, seed=seed).x
    shape = parse_input_shape(input_shape) if input_shape else None
    if shape is None and inputs is None and meta.input_size is None:
        raise UserError(f"{checkpoint} does not record its input size: give --input CxHxW or --data SPEC")
    from compressor.threads import threads_for

    probe = tuple(inputs.shape[1:]) if inputs is not None else shape or (meta.in_chans or 3, *meta.input_size)
    with threads_for(model.eval(), probe, 32):  # the parity check's threads (onnxruntime follows torch's)
        report = export_model(model, out, inputs=inputs, inputs_from_data=inputs is not None, metadata=meta,
                              input_shape=shape, opset=opset, exporter=exporter, simplify=simplify, atol=atol,
                              log=lambda m: click.echo(m, err=True))
    for line in report.summary_lines():
        click.echo(line)
    result = {"export": report.to_dict()}
    if int8:
        calibration = source.sample("train", calibration_samples, seed=seed).x
        test = source.loader("test", 256, shuffle=False, augment=False)
        comparison = quantize_model(out, int8_out, [calibration[i:i + 32] for i in range(0, len(calibration), 32)],
                                    test, margin=int8_margin, settings=QuantizeSettings(calibration_method=calibration_method),
                                    val_batches=source.loader("val", 256, shuffle=False, augment=False),
                                    keep_anyway=keep_int8_anyway, max_float=int8_max_float,
                                    log=lambda m: click.echo(m, err=True))
        for line in comparison.summary_lines():
            click.echo(line)
        result["int8"] = comparison.to_dict()
    if report_path:
        with atomic_output(report_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        click.echo(f"report: {report_path}")
    if int8 and comparison.missed_margin and not comparison.written:
        missed_margin_exit(comparison.control.missed_line())


def _check_fits(meta, source, spec: str) -> None:
    """The data must be what the model takes: same classes, same image shape."""
    if meta.num_classes is not None and meta.num_classes != source.num_classes:
        raise UserError(f"the model predicts {meta.num_classes} classes but {spec} has {source.num_classes}")
    shape = tuple(source.input_shape)
    if meta.in_chans is not None and meta.in_chans != shape[0]:
        raise UserError(f"the model takes {meta.in_chans}-channel images but {spec} has {shape[0]} channels")
    if meta.input_size is not None and tuple(meta.input_size) != shape[1:]:
        raise UserError(f"the model was trained at {'x'.join(map(str, meta.input_size))} but {spec} is "
                        f"{'x'.join(map(str, shape[1:]))}")
    if meta.input_size is None:
        meta.in_chans, meta.input_size = shape[0], list(shape[1:])
    if meta.mean is None:
        meta.mean, meta.std = list(source.mean), list(source.std)
    if meta.class_names is None:
        meta.class_names = list(source.class_names)
