"""The ``kdcompress`` command: a thin click shell over the library.

Each sub-command lives in its own module in this package and exposes ``command`` (a click
command); modules are discovered, so adding a command touches no other file. A
:class:`compressor.errors.UserError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from compressor.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """kdcompress: distil a big classifier into a small one that fits a budget, then export and time it.

    FLOPs follow fvcore's convention: one fused multiply-add counts as one FLOP.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _cmd in getattr(_module, "commands", [getattr(_module, "command", None)]):
        if _cmd is not None:
            cli.add_command(_cmd)


def main() -> None:
    cli.main(prog_name="kdcompress", standalone_mode=True)


