"""``kdcompress data-info SPEC``: what a data spec resolves to (classes, shapes, splits, normalisation)."""

from __future__ import annotations

import json

import click


class _DataInfoCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from compressor.data import list_sources

        formatter.write_paragraph()
        with formatter.section("SPEC forms"):
            formatter.write_dl([(e.usage, e.summary) for e in list_sources()])


@click.command("data-info", cls=_DataInfoCommand)
@click.argument("spec")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Training fraction held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the val hold-out and corruptions.")
@click.option("--label-noise", type=float, default=0.0, show_default=True, help="Symmetric label-noise rate sigma in [0, 1).")
@click.option("--imbalance", type=float, default=1.0, show_default=True, help="Max/min class-size ratio (1 = balanced).")
@click.option("--imbalance-gamma", type=float, default=None, help="Use the power-law imbalance profile with this exponent.")
@click.option("--input-size", type=int, default=None, help="Image folders: side of the square input.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def command(spec: str, val_fraction: float, seed: int, label_noise: float, imbalance: float,
            imbalance_gamma: float | None, input_size: int | None, as_json: bool) -> None:
    """Show what SPEC resolves to (the forms SPEC takes are listed below)."""
    from compressor.data import SPLITS, load_source, parse_spec

    parsed = parse_spec(spec)
    extra = {k: v for k, v in {"input_size": input_size, "num_workers": 0}.items() if parsed.entry.takes(k)}
    src = load_source(parsed, val_fraction=val_fraction, seed=seed, label_noise=label_noise, imbalance=imbalance,
                      imbalance_gamma=imbalance_gamma, **extra)
    info = src.describe()
    info["splits"] = {s: src.split_size(s) for s in SPLITS}
    info["train_class_counts"] = src.class_counts("train")
    if as_json:
        click.echo(json.dumps(info))
        return
    names = info["class_names"]
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    click.echo(f"spec          {info['spec']}")
    click.echo(f"source        {info['name']}")
    click.echo(f"classes       {info['num_classes']}: {shown}")
    click.echo(f"input shape   {' x '.join(map(str, info['input_shape']))} (C x H x W)")
    click.echo("splits        " + ", ".join(f"{s} {n}" for s, n in info["splits"].items()))
    click.echo(f"mean          {', '.join(f'{v:.4f}' for v in info['mean'])}")
    click.echo(f"std           {', '.join(f'{v:.4f}' for v in info['std'])}")
    counts = info["train_class_counts"]
    click.echo(f"train/class   min {min(counts)}, max {max(counts)}")
    opts = info["options"]
    if opts["label_noise"] or opts["imbalance"] != 1.0:
        click.echo(f"corruptions   label noise {opts['label_noise']}, imbalance {opts['imbalance']}"
                   + (f" (power law, gamma {opts['imbalance_gamma']})" if opts["imbalance_gamma"] else " (exponential)"))

