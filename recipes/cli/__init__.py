"""The ``kdcompress`` command: a thin click shell over the library.

Each sub-command lives in its own module in this package and exposes ``command`` (a click
command); modules are discovered, so adding a command touches no other file. A
:class:`compressor.errors.UserError` anywhere becomes one line on stderr and exit status 2, and so
does a write the file system refuses (full disk, read-only folder) that no writer turned into one.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from compressor.atomic import CANNOT_WRITE
from compressor.errors import UserError
from compressor.plugins import import_submodules
from recipes.cli._options import (
    int8_control_options,
    missed_margin_exit,
    planning_options,
    planning_values,
    target_option,
    threads_option,
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except OSError as err:  # a full disk or a read-only folder is the user's to fix; other OSErrors are bugs
            if err.errno not in CANNOT_WRITE:
                raise
            click.echo(f"error: {err.filename or 'a file'}: {os.strerror(err.errno)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:  # Ctrl-C: say how to continue, with the shell's status for SIGINT
            click.echo(f"interrupted: {_resume_hint(ctx)}", err=True)
            ctx.exit(130)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        ctx.meta["kdcompress.command"] = (cmd, [name or "", *rest])  # what an interrupted command was
        return name, cmd, rest


def _resume_hint(ctx: click.Context) -> str:
    """The command that continues an interrupted run (main command: --resume DIR; a sub-command
    with a --resume flag: the same command line with it), or why there is none."""
    import shlex

    command, argv = ctx.meta.get("kdcompress.command", (None, []))
    if command is None:
        params = ctx.params
        from recipes.compress import default_out_dir

        run_dir = Path(params.get("resume_dir") or params.get("out")
                       or default_out_dir(params.get("teacher"), params.get("budgets") or ()))
        if not (run_dir / "plan.yaml").is_file():
            return "the run had not started, so there is nothing to resume"
        return f"continue with: kdcompress --resume {shlex.quote(str(run_dir))}"
    if not any(param.name == "resume" for param in command.params):
        return f"kdcompress {argv[0]} stopped before it finished"
    return "continue with: kdcompress " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@planning_options
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output directory (default runs/<teacher>-<budget>/)")
@click.option("--int8", is_flag=True, help="also write student.int8.onnx (static QDQ, calibrated on training images)")
@int8_control_options(max_float=False)
@target_option
@click.option("--baseline", is_flag=True, help="also train the student without distillation and report the KD gain")
@click.option("--search", type=click.Choice(["rule", "probe"]), default="rule", show_default=True,
              help="rule: the documented pick; probe: short distillations of the top candidates, best on validation")
@click.option("--probe-k", default=4, show_default=True, type=click.IntRange(min=1), help="candidates a probe search trains")
@click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
              help="continue the run in this directory at the stage and epoch where it stopped")
@click.option("--force", is_flag=True, help="replace a finished or broken run in the output directory")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present, else CPU), cpu, cuda:N")
@click.option("--dry-run", is_flag=True, help="print the plan and stop (same as `kdcompress plan`)")
@threads_option
@click.pass_context
def cli(ctx: click.Context, teacher, teacher_arch, budgets, data, recipe, method, family, candidates, gap_threshold, epochs,
        latency_threads, seed, preset, trust, label_noise, imbalance, imbalance_gamma, out, int8, int8_margin,
        keep_int8_anyway, targets, baseline, search, probe_k, resume_dir, force, device, dry_run, threads) -> None:
    """kdcompress: distil a big classifier into a small one that fits a budget, then export and time it.

    \b
    kdcompress --teacher resnet110.pt --budget 2MFLOPs          (the whole flow)
    kdcompress --teacher resnet110.pt --budget 10x --dry-run    (the plan only)
    kdcompress COMMAND --help                                   (the other commands)

    FLOPs follow fvcore's convention: one fused multiply-add counts as one FLOP.
    """
    from compressor.threads import request

    ctx.with_resource(request(threads))  # --threads before a sub-command holds for it too
    if ctx.invoked_subcommand is not None:
        return
    if not (teacher or budgets or resume_dir or preset):
        click.echo(ctx.get_help())
        return
    planning = planning_values(ctx.params)
    if dry_run:
        from recipes.cli.plan import show_plan

        show_plan(planning, output=None)
        return
    from recipes.compress import compress
    from recipes.report import summary_rows

    result = compress(
        budget=planning.pop("budgets"), **planning, out=resume_dir or out, int8=int8, int8_margin=int8_margin,
        keep_int8_anyway=keep_int8_anyway, targets=targets, baseline=baseline, search=search, probe_k=probe_k,
        resume=resume_dir is not None, force=force, device=device, echo=lambda line: click.echo(line, err=True),
    )
    rows = summary_rows(result.report)
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'':<{width}}  {'teacher':>12}  {'student':>12}")
    for name, t, s in rows:
        click.echo(f"{name:<{width}}  {t:>12}  {s:>12}")
    baseline = result.report.baseline
    if baseline and baseline.kd_gain is not None:
        click.echo(f"KD gain over the vanilla student: {baseline.kd_gain:+.2f} points "
                   f"({baseline.test_top1:.2f}% without distillation)")
    click.echo(f"wrote {result.out_dir}/: " + ", ".join(sorted(Path(p).name for k, p in result.files.items()
                                                                if not k.startswith("plot:"))) + ", plots/")
    int8_row = result.report.student.int8 or {}
    if int8_row.get("missed_margin") and not int8_row.get("written"):
        missed_margin_exit((int8_row.get("control") or {}).get("verdict", "the int8 model missed --int8-margin"))


for _module in import_submodules(__name__, __path__):
    for _cmd in getattr(_module, "commands", [getattr(_module, "command", None)]):
        if _cmd is not None:
            cli.add_command(_cmd)


def main() -> None:
    cli.main(prog_name="kdcompress", standalone_mode=True)


