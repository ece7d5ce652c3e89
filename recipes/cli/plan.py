"""`kdcompress plan`: print the plan and the reason for every choice, without training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from recipes.cli._options import planning_options, planning_values

if TYPE_CHECKING:
    from recipes.plan import Plan


def print_plan(plan: Plan) -> None:
    from compressor.cost import FLOP_CONVENTION

    click.echo(f"recipe: {plan.recipe}   data: {plan.data}   budget: {', '.join(plan.budget_texts) or '-'}")
    click.echo("why:")
    for reason in plan.reasons:
        click.echo(f"  - {reason}")
    click.echo("stages:")
    for i, stage in enumerate(plan.stages, 1):
        teachers = ", ".join(stage.teachers) or "(none)"
        click.echo(f"  {i}. {stage.name}: {stage.arch} via {stage.scheme}"
                   f"{' [' + stage.method.text + ']' if stage.method else ''} from {teachers}; "
                   f"{stage.config.epochs} epochs, lr {stage.config.lr}")
    click.echo(f"({FLOP_CONVENTION})")


def show_plan(values: dict[str, Any], output: str | None) -> None:
    """Plan what the planning options ask (a search, or a preset filled from them) and show it; the
    main command's --dry-run is this. A preset's teacher is read (for its dataset); the data is not
    opened unless given."""
    from recipes.api import main_request, plan_compression

    plan, inputs = plan_compression(main_request(**values))
    for note in inputs.notes if inputs is not None else []:
        click.echo(note, err=True)
    print_plan(plan)
    if output:
        plan.save(output)
        click.echo(f"plan written to {output}")
    else:
        click.echo("--- plan.yaml ---")
        click.echo(plan.to_yaml().rstrip())


@click.command("plan")
@planning_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="also write the plan as YAML")
@click.pass_context
def command(ctx: click.Context, output: str | None, **_planning: Any) -> None:
    """Plan a compression (student search, recipe, stages) and explain it; trains nothing."""
    show_plan(planning_values(ctx.params), output)
