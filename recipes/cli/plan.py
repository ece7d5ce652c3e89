"""`kdcompress plan`: print the plan and the reason for every choice, without training."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from recipes.cli._options import corruption_from_flags, planning_options

if TYPE_CHECKING:
    from compressor.data.corruptions import Corruption
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


def preset_for_plan(preset: str, *, teacher: str | None, teacher_arch: str | None, data: str | None,
                    method: str | None, seed: int | None, epochs: int | None, trust: bool,
                    corruption: Corruption | None = None) -> Plan:
    """A bundled preset (by name) or a plan file, its blanks filled from the command line as the main
    command and `distill` fill them; the teacher is read (for its dataset), the data is not opened
    unless given."""
    from compressor.data.corruptions import Corruption
    from recipes.context import resolve_inputs
    from recipes.distill_plan import load_preset, preset_plan

    raw = load_preset(preset)
    teacher = teacher or raw.get("teacher")  # a saved plan names its teacher
    corruption = corruption or Corruption.from_dict(raw.get("corruption"))  # and its corruptions
    if teacher is not None or data is not None:
        inputs = resolve_inputs(teacher, data, arch=teacher_arch, trust=trust, load_data=False, seed=seed or 0,
                                corruption=corruption)
        data = inputs.data_spec
        for note in inputs.notes:
            click.echo(note, err=True)
    return preset_plan(preset, teacher=teacher, data=data, teacher_arch=teacher_arch, method=method, seed=seed,
                       train={"epochs": epochs}, corruption=corruption)


@click.command("plan")
@planning_options
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="also write the plan as YAML")
def command(teacher, teacher_arch, budgets, data, recipe, method, family, candidates, gap_threshold, epochs, latency_threads,
            seed, preset, trust, label_noise, imbalance, imbalance_gamma, output) -> None:
    """Plan a compression (student search, recipe, stages) and explain it; trains nothing."""
    from recipes.api import plan_compression

    corruption = corruption_from_flags(label_noise, imbalance, imbalance_gamma)
    if preset:
        plan = preset_for_plan(preset, teacher=teacher, teacher_arch=teacher_arch, data=data, method=method,
                               seed=seed, epochs=epochs, trust=trust, corruption=corruption)
    else:
        plan, inputs = plan_compression(
            teacher=teacher, budgets=budgets, data=data, teacher_arch=teacher_arch, recipe=recipe, method=method,
            family=family, gap_threshold=gap_threshold, epochs=epochs, seed=seed, latency_threads=latency_threads,
            trust=trust, corruption=corruption, candidates=candidates,
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
