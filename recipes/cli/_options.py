"""Parsing helpers shared by several commands (not a command module: the name starts with _)."""

from __future__ import annotations

import click

from compressor.errors import UserError


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``3x32x32`` (C x H x W) or ``32`` (3 x 32 x 32) -> (C, H, W)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = [3, dims[0], dims[0]]
    if len(dims) != 3 or min(dims) <= 0:
        raise UserError(f"input shape {text!r} is not CxHxW, e.g. 3x32x32 or 1x8x8")
    return dims[0], dims[1], dims[2]


def input_shape_option(default: str | None = "3x32x32"):
    return click.option(
        "--input", "input_shape", default=default, show_default=default is not None,
        help="input shape C x H x W, e.g. 3x32x32 (CIFAR) or 1x8x8 (digits)",
    )


trust_option = click.option(
    "--trust-checkpoint", "trust", is_flag=True,
    help="allow loading a file that holds pickled Python objects (it can run code: only for files you trust)",
)
