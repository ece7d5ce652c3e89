"""`kdcompress zoo` (every architecture with its cost) and `kdcompress flops` (one model or file)."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.errors import UserError
from recipes.cli._options import input_shape_option, parse_input_shape, trust_option


@click.command("zoo")
@input_shape_option()
@click.option("--num-classes", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--family", default=None, help="only this family (e.g. resnet, wrn, mobilenetv2)")
@click.option("--sort", "sort_key", type=click.Choice(["flops", "params", "name"]), default="flops", show_default=True)
def zoo_command(input_shape: str, num_classes: int, family: str | None, sort_key: str) -> None:
    """List the model zoo with parameters and FLOPs measured by fvcore."""
    from compressor.cost import FLOP_CONVENTION, measure_arch
    from compressor.models import aliases_of, list_models, model_family

    shape = parse_input_shape(input_shape)
    names = list_models(family=family, aliases=False)
    if not names:
        raise UserError(f"no models in family {family!r}; families: see `kdcompress zoo` without --family")
    rows = []
    with click.progressbar(names, label="measuring", file=click.get_text_stream("stderr")) as bar:
        for name in bar:
            cost = measure_arch(name, num_classes, shape)
            rows.append((name, model_family(name), ",".join(aliases_of(name)), cost.params, cost.flops))
    index = {"flops": 4, "params": 3, "name": 0}[sort_key]
    rows.sort(key=lambda r: r[index])
    click.echo(f"input {'x'.join(map(str, shape))}, {num_classes} classes; {FLOP_CONVENTION}")
    click.echo(f"{'model':<24} {'family':<14} {'params (M)':>11} {'MFLOPs':>10}  aliases")
    for name, fam, aliases, params, flops in rows:
        click.echo(f"{name:<24} {fam:<14} {params / 1e6:>11.3f} {flops / 1e6:>10.2f}  {aliases}")


@click.command("flops")
@click.argument("model")
@click.option("--input", "input_shape", default=None, help="C x H x W; default: the checkpoint's, else 3x32x32")
@click.option("--num-classes", default=None, type=click.IntRange(min=1), help="for a model name (default 100)")
@click.option("--arch", default=None, help="architecture of a bare state_dict file")
@trust_option
def flops_command(model: str, input_shape: str | None, num_classes: int | None, arch: str | None, trust: bool) -> None:
    """Parameters and FLOPs of one model name or checkpoint file."""
    from compressor.checkpoint import load_model
    from compressor.cost import FLOP_CONVENTION, format_flops, measure
    from compressor.models import create

    if Path(model).exists():
        loaded = load_model(model, arch=arch, trust=trust)
        net, label = loaded.model, f"{model} ({loaded.meta.arch})"
        shape = parse_input_shape(input_shape) if input_shape else (loaded.meta.input_shape or (loaded.meta.in_chans, 32, 32))
    else:
        if any(sep in model for sep in ("/", "\\")) or model.endswith((".pt", ".pth", ".onnx")):
            raise UserError(f"{model} does not exist (give a model name or an existing checkpoint)")
        shape = parse_input_shape(input_shape or "3x32x32")
        net, label = create(model, num_classes=num_classes or 100, in_chans=shape[0]), model
    cost = measure(net, shape)
    click.echo(f"{label}: input {'x'.join(map(str, shape))}")
    click.echo(f"  params  {cost.params:,} ({cost.params / 1e6:.3f} M)")
    click.echo(f"  FLOPs   {cost.flops:,} ({format_flops(cost.flops)}; {FLOP_CONVENTION})")
    if cost.uncounted:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(cost.uncounted.items()))
        click.echo(f"  not counted by fvcore (element-wise, negligible in conv nets): {ops}")


commands = [zoo_command, flops_command]
