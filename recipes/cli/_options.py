"""Parsing helpers shared by several commands (not a command module: the name starts with _).

Nothing here (or at the top of a command module) imports torch, onnx or the data sources: the
CLI is built on every call, and ``kdcompress --help`` must not pay seconds for them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import click

from compressor.errors import UserError
from recipes.budget import budget_help
from recipes.request import CANDIDATE_SETS, DEFAULT_CANDIDATES, DEFAULT_GAP_THRESHOLD, DEFAULT_METHOD, RECIPES

if TYPE_CHECKING:
    from compressor.data.corruptions import Corruption


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose names come from a registry that is imported only when they are needed
    (parsing the option, or this command's own --help), not when the CLI is built."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self._names: tuple[str, ...] | None = None
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns the (empty) placeholder
        pass


class LazyHelpOption(click.Option):
    """A ``click.Option`` whose help text is made from a registry only when a help page shows it."""

    def __init__(self, *args, help_text: Callable[[], str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_text = help_text

    def get_help_record(self, ctx: click.Context):
        if self._help_text is not None:
            self.help, self._help_text = self._help_text(), None
        return super().get_help_record(ctx)


def data_option(default: str | None = None, what: str = "", *, listed: bool = True):
    """``--data SPEC``: its help lists every registered source form (from the registry, when a help
    page shows it). ``what`` says what the data is for here; ``listed=False`` (the main command)
    points at `kdcompress data-info --help` instead, so `kdcompress --help` imports no data source."""

    def text() -> str:
        if listed:
            from compressor.data import data_help

            forms = data_help()
        else:
            forms = "a data spec NAME[:DIR], e.g. digits or cifar100:DIR; every form: kdcompress data-info --help"
        return forms + (f" ({what})" if what else "")

    return click.option("--data", default=default, show_default=default is not None, cls=LazyHelpOption,
                        help_text=text)


threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="CPU intra-op threads (default: the cores this process can use that no other process is busy on, "
         "one for small ops on a shared machine; see compressor/threads.py); set it for bit-identical reruns",
)


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


def positive_finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A click callback: a positive finite float (click's FloatRange lets inf and nan through), one line if not."""
    if value is not None and not 0 < value < math.inf:
        raise UserError(f"{param.opts[-1]} must be a positive finite number (got {value})")
    return value


def input_shape_option(default: str | None = "3x32x32"):
    return click.option(
        "--input", "input_shape", default=default, show_default=default is not None,
        help="input shape C x H x W, e.g. 3x32x32 (CIFAR) or 1x8x8 (digits)",
    )


trust_option = click.option(
    "--trust-checkpoint", "trust", is_flag=True,
    help="allow loading a file that holds pickled Python objects (it can run code: only for files you trust)",
)


MISSED_MARGIN_STATUS = 3  # = export.int8_control.MISSED_MARGIN_STATUS (not imported here: it pulls in torch)


def int8_control_options(func=None, *, max_float: bool = True):
    """``--int8-margin``, ``--keep-int8-anyway`` (and ``--int8-max-float`` unless ``max_float=False``):
    accuracy control of the int8 file (export/int8_control.py), on `export --int8` and the main command."""
    if func is None:
        return lambda f: int8_control_options(f, max_float=max_float)
    options = [
        click.option("--int8-margin", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="top-1 points the int8 model may lose against fp32 on the validation split; beyond it "
                          "the most sensitive layers stay float, one at a time, until it fits"),
        click.option("--keep-int8-anyway", is_flag=True,
                     help="write the int8 file even when no fallback fits the margin (default: not written, "
                          f"exit status {MISSED_MARGIN_STATUS})"),
        click.option("--int8-max-float", default=None, type=click.IntRange(min=0),
                     help="at most this many layers left float (default: all but one)"),
    ][:3 if max_float else 2]
    for option in reversed(options):
        func = option(func)
    return func


def missed_margin_exit(line: str) -> None:
    """The int8 file missed the margin and was not written; everything else was: one line, status 3."""
    click.echo(f"error: {line}", err=True)
    raise click.exceptions.Exit(MISSED_MARGIN_STATUS)


def corruption_options(func):
    """``--label-noise``, ``--imbalance``, ``--imbalance-gamma``: the KD robustness study's training-set
    corruptions (Sarfraz et al.). Plain floats here; :func:`corruption_from_flags` checks them, so a bad
    value is one line and exit 2 (click's own range errors print a usage block)."""
    options = [
        click.option("--label-noise", type=float, default=None,
                     help="symmetric label noise: this fraction of training labels moved to another class, in [0, 1)"),
        click.option("--imbalance", type=float, default=None,
                     help="class imbalance: largest/smallest training class ratio, >= 1 (exponential long tail)"),
        click.option("--imbalance-gamma", type=float, default=None,
                     help="power-law imbalance profile with this exponent > 0 (ratio 20 unless --imbalance says)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def corruption_from_flags(label_noise: float | None, imbalance: float | None,
                          imbalance_gamma: float | None) -> Corruption | None:
    """The checked corruption, or None when no flag was given (a resumed run or a preset keeps its own)."""
    if label_noise is None and imbalance is None and imbalance_gamma is None:
        return None
    from compressor.data.corruptions import Corruption

    return Corruption.create(label_noise, imbalance, imbalance_gamma)


def planning_values(params: dict) -> dict:
    """The planning options' values (as click parsed them) as the request's fields, the corruption
    flags as one checked value."""
    names = ("teacher", "teacher_arch", "budgets", "data", "recipe", "method", "family", "candidates", "gap_threshold",
             "epochs", "latency_threads", "seed", "preset", "trust")
    values = {name: params[name] for name in names}
    values["corruption"] = corruption_from_flags(params["label_noise"], params["imbalance"], params["imbalance_gamma"])
    return values


def planning_options(func):
    """The options shared by the main command and `kdcompress plan` (their values: :func:`planning_values`)."""
    options = [
        click.option("--teacher", "teacher", default=None, help="the trained teacher (.pt: kdcompress, RepDistiller, or a state_dict with --teacher-arch)"),
        click.option("--teacher-arch", default=None, help="architecture of a teacher file that does not record it"),
        click.option("--budget", "budgets", multiple=True, help=budget_help()),
        data_option(what="default: the teacher's recorded dataset", listed=False),
        click.option("--recipe", default=None, type=click.Choice(RECIPES),
                     help="force a scheme (default: chosen from the capacity gap)"),
        click.option("--method", default=None, help="knowledge method per stage, e.g. hinton+crd or "
                     f"hinton:0.9,crd:0.8,ce:1.0 (default {DEFAULT_METHOD})"),
        click.option("--family", default=None, help="only students of this zoo family"),
        click.option("--candidates", default=DEFAULT_CANDIDATES, show_default=True, type=click.Choice(CANDIDATE_SETS),
                     help="students searched: the zoo, the teacher itself with channels pruned to the budget "
                          "(Torch-Pruning, then distilled back from the unpruned teacher), or both"),
        click.option("--gap-threshold", default=DEFAULT_GAP_THRESHOLD, show_default=True, type=click.FloatRange(min=1.0, min_open=True),
                     help="teacher/student FLOPs ratio above which teacher assistants are inserted"),
        click.option("--epochs", default=None, type=click.IntRange(min=1), help="epochs per stage (default: the dataset's protocol)"),
        click.option("--latency-threads", default=1, show_default=True, type=click.IntRange(min=1),
                     help="onnxruntime intra-op threads for latency budgets"),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--preset", default=None, type=click.Path(dir_okay=False),
                     help="a bundled preset name (recipes/presets) or a plan YAML, run instead of planning"),
        trust_option,
    ]
    for option in reversed(options):
        func = option(func)
    return corruption_options(func)


def target_file_names() -> list[str]:
    """The export targets' names as their files give them (``export/targets/<name>_target.py``), ONNX
    first: importing the registry would import torch and onnx (over 1 s) just to print --help."""
    import importlib.util

    spec = importlib.util.find_spec("export")  # finds the package without running its __init__
    folder = Path(next(iter(spec.submodule_search_locations))) / "targets"
    names = sorted(path.name.removesuffix("_target.py") for path in folder.glob("*_target.py"))
    return sorted(names, key=lambda name: name != "onnx")


class _TargetOption(click.Option):
    """``--target``'s help lists the registered export targets, read from the registry only when
    the help is shown (building the CLI must not import torch). A plain string, checked by the
    registry: an unknown name is one line listing the known ones (click's Choice prints a usage block)."""

    def get_help_record(self, ctx: click.Context):
        self.help = (f"export target, repeatable: {', '.join(target_file_names())}; each file is verified in its own "
                     "runtime (the heavy ones need their extra, e.g. pip install 'kdcompress[executorch]')")
        return super().get_help_record(ctx)


target_option = click.option("--target", "targets", multiple=True, default=("onnx",), show_default=True,
                             cls=_TargetOption, metavar="NAME")
