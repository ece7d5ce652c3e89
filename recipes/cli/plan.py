"""`kdcompress plan`: print the plan and the reason for every choice, without training."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from recipes.cli._options import corruption_from_flags, planning_options

if TYPE_CHECKING:
    from recipes.plan import Plan


def print_plan(plan: Plan) -> None:
    from compressor.cost import FLOP_CONVENTION

    click.echo(f"recipe: {plan.recipe}   data: {plan.data}   budget: {', '.join(plan.budgets) or '-'}")
    click.echo("why:")
    for reason in plan.reasons:
        click.echo(f"  - {reason}")
    click.echo("stages:")
    for i, stage in enumerate(plan.stages, 1):
        teachers = ", ".join(stage.teachers) or "(none)"
        train = stage.train
        click.echo(f"  {i}. {stage.name}: {stage.arch} via {stage.scheme}"
                   f"{' [' + stage.method + ']' if stage.method else ''} from {teachers}; "
                   f"{train.get('epochs', '?')} epochs, lr {train.get('lr', '?')}")
    click.echo(f"({FLOP_CONVENTION})")


@click.command("plan")
@planning_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="also write the plan as YAML")
def command(teacher, teacher_arch, budgets, data, recipe, method, family, gap_threshold, epochs, latency_threads,
            seed, preset, trust, label_noise, imbalance, imbalance_gamma, output) -> None:
    """Plan a compression (student search, recipe, stages) and explain it; trains nothing."""
    from recipes.api import plan_compression
    from recipes.plan import Plan

    corruption = corruption_from_flags(label_noise, imbalance, imbalance_gamma)
    if preset:
        plan = Plan.load(preset)
    else:
        plan, inputs = plan_compression(
            teacher=teacher, budgets=budgets, data=data, teacher_arch=teacher_arch, recipe=recipe, method=method,
            family=family, gap_threshold=gap_threshold, epochs=epochs, seed=seed, latency_threads=latency_threads,
            trust=trust, corruption=corruption,
        )
        for note in inputs.notes:
            click.echo(note, err=True)
    print_plan(plan)
    if output:
        plan.save(output)
        click.echo(f"plan written to {output}")
    else:
        click.echo("--- plan.yaml ---")
        click.echo(plan.to_yaml().rstrip())
