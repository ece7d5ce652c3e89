"""`kdcompress eval`: accuracy and per-class accuracy of a checkpoint on a data split."""

from __future__ import annotations

import json
import math

import click

from recipes.cli._options import data_option, trust_option


@click.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@data_option(what="default: the checkpoint's dataset")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--arch", default=None, help="architecture of a file that does not record it (a bare state_dict)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@trust_option
def command(checkpoint, data, split, batch_size, device, arch, as_json, trust) -> None:
    """Top-1, top-5 and per-class accuracy of CHECKPOINT on a split of DATA."""
    from recipes.training import evaluate_checkpoint

    score = evaluate_checkpoint(checkpoint, data, split=split, batch_size=batch_size, device=device, arch=arch,
                                trust=trust)
    for warning in score.warnings:
        click.echo(warning, err=True)
    r = score.result
    if as_json:
        click.echo(json.dumps({
            "checkpoint": checkpoint, "arch": score.loaded.meta.arch, "data": score.data, "split": split,
            **r.to_dict(), "per_class": {n: (None if math.isnan(a) else a) for n, a in zip(score.class_names, r.per_class)},
        }, indent=2))
        return
    click.echo(f"{checkpoint} ({score.loaded.meta.arch}) on {score.data}, {split} split: {r.count} images"
               + ("  [inputs re-normalised to the checkpoint's mean/std]" if score.renormalized else ""))
    click.echo(f"top-1 {r.top1:.2f}%   top-5 {r.top5:.2f}%   loss {r.loss:.4f}")
    width = max([5] + [len(n) for n in score.class_names])
    click.echo(f"{'class':<{width}}  {'accuracy':>8}  {'images':>6}")
    for name, acc, n in zip(score.class_names, r.per_class, r.per_class_count):
        shown = "-" if math.isnan(acc) else f"{acc:.2f}%"
        click.echo(f"{name:<{width}}  {shown:>8}  {n:>6}")
