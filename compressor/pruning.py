"""Structured channel pruning of a teacher down to a FLOPs/params budget (Torch-Pruning).

Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") traces the model
into a dependency graph, so removing an output channel of one convolution also removes the
matching BatchNorm entries, the next layer's input channel and every layer coupled to it by a
residual add. The channels are physically removed: the result is an ordinary, smaller module.

How the budget is met: one pruning ratio ``r`` (the fraction of channels each prunable group
loses) is SOLVED by bisection. Each trial prunes a deep copy of the teacher at ``r`` and measures
it with :func:`compressor.cost.measure` (fvcore, the same counter the zoo is ranked with); the
smallest ``r`` whose measured FLOPs and params fit is kept, i.e. the largest pruned model that
fits. Measured cost is monotone in ``r`` here because kept counts are rounded *down* (to
``round_to``) from ``int(C * (1 - r))``.

Defaults and why:
  * importance ``l1``: the L1 norm of each channel's weights over its whole coupled group (Li et
    al. 2017, "Pruning Filters for Efficient ConvNets"). It needs no data, so the planner can
    prune while planning, and it is deterministic. After recovery training the criterion matters
    little (Liu et al. 2019, "Rethinking the Value of Network Pruning": the pruned structure,
    trained back, carries most of the accuracy). ``taylor`` (Molchanov et al. 2019) needs a
    labelled calibration batch.
  * scope ``layer`` (Torch-Pruning's default, ``global_pruning=False``): every group loses the
    same fraction, so the teacher keeps its proportions, like the width multiplier of the zoo's
    scaled families. A global ranking compares magnitudes across layers whose scales differ and
    can strip one layer bare; it is available as ``global``.
  * ``round_to=8``: kept channel counts are multiples of 8, which vectorised kernels (oneDNN,
    cuDNN tensor cores, ORT's MLAS) run at full speed; odd widths save FLOPs but not time.
  * the classifier is never pruned (its outputs are the classes).

A pruned model is saved as its *pruning history* (root layer name, out/in, removed indices),
replayed on a fresh zoo model by :func:`replay`; no module is pickled (``compressor.checkpoint``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from compressor.cost import Cost, measure
from compressor.errors import UserError

TOOL = "torch-pruning"
DEFAULT_IMPORTANCE = "l1"
DEFAULT_SCOPE = "layer"
DEFAULT_ROUND_TO = 8
RATIO_TOLERANCE = 1 / 256  # bisection stops when the ratio is known this closely (8 trials)
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class ImportanceSpec:
    factory: Callable[[], Any]
    needs_gradients: bool
    reference: str


def _tp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning

    return torch_pruning


IMPORTANCES: dict[str, ImportanceSpec] = {
    "l1": ImportanceSpec(lambda: _tp().importance.GroupMagnitudeImportance(p=1), False,
                         "Li et al. 2017, filter L1 norm"),
    "l2": ImportanceSpec(lambda: _tp().importance.GroupMagnitudeImportance(p=2), False,
                         "Torch-Pruning's default, group L2 norm"),
    "bn": ImportanceSpec(lambda: _tp().importance.BNScaleImportance(), False,
                         "Liu et al. 2017 (Network Slimming), |BatchNorm gamma|"),
    "fpgm": ImportanceSpec(lambda: _tp().importance.FPGMImportance(), False,
                           "He et al. 2019, distance to the geometric median"),
    "taylor": ImportanceSpec(lambda: _tp().importance.GroupTaylorImportance(), True,
                             "Molchanov et al. 2019, first-order Taylor |w * dL/dw|; needs a labelled batch"),
}


@dataclass(frozen=True)
class PruneSettings:
    """How to prune; parse user strings with :meth:`parse` once, at the edge."""

    importance: str = DEFAULT_IMPORTANCE
    scope: str = DEFAULT_SCOPE  # "layer": one ratio for every group; "global": one ranking for all
    round_to: int = DEFAULT_ROUND_TO

    @classmethod
    def parse(cls, importance: str | None = None, scope: str | None = None,
              round_to: int | None = None) -> "PruneSettings":
        imp = (importance or DEFAULT_IMPORTANCE).strip().lower()
        if imp not in IMPORTANCES:
            raise UserError(f"unknown pruning importance {importance!r}; known: {', '.join(IMPORTANCES)}")
        sc = (scope or DEFAULT_SCOPE).strip().lower()
        if sc not in SCOPES:
            raise UserError(f"unknown pruning scope {scope!r}; known: {', '.join(SCOPES)}")
        rt = DEFAULT_ROUND_TO if round_to is None else int(round_to)
        if rt < 1:
            raise UserError(f"pruning round_to must be 1 or more (got {round_to})")
        return cls(imp, sc, rt)


@dataclass
class PruneResult:
    model: nn.Module  # the pruned copy, eval mode; the teacher is untouched
    ratio: float
    cost: Cost
    teacher_cost: Cost
    record: dict[str, Any] = field(default_factory=dict)  # what rebuilds it: goes into ModelMeta.pruning

    @property
    def history(self) -> list:
        return self.record.get("history", [])


class _Collapse(Exception):
    """A trial would remove every channel of a group (a whole layer, and with it a stage)."""

    def __init__(self, layers: list[str]) -> None:
        super().__init__(", ".join(layers))
        self.layers = layers


def prune_to_budget(
    model: nn.Module,
    input_shape: Sequence[int],
    max_flops: float | None = None,
    max_params: float | None = None,
    settings: PruneSettings = PruneSettings(),
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str | None = None,
    check: tuple[str, Callable[[nn.Module], bool]] | None = None,
) -> PruneResult:
    """The largest structurally pruned copy of ``model`` whose measured FLOPs and params fit.

    ``check`` is (what it limits, predicate): one more budget a trial must pass, such as a timed
    latency (run only on trials that already meet the FLOPs/params limits).
    Raises a one-line UserError when the graph cannot be pruned (naming the layer) or when even the
    strongest pruning that leaves every layer some channels stays above the budget.
    """
    if max_flops is None and max_params is None and check is None:
        raise UserError("pruning needs a FLOPs, params or latency budget")
    spec = IMPORTANCES[settings.importance]
    if spec.needs_gradients and calibration is None:
        raise UserError(f"pruning importance {settings.importance!r} needs a labelled calibration batch; "
                        f"use {DEFAULT_IMPORTANCE!r} for data-free pruning")
    label = name or getattr(model, "kd_arch", None) or type(model).__name__
    shape = tuple(int(s) for s in input_shape)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    teacher_cost = measure(model, shape)
    earlier = list((getattr(model, "kd_pruning", None) or {}).get("history", []))  # pruned again: replay both

    def fits(candidate: nn.Module, cost: Cost) -> bool:
        return ((max_flops is None or cost.flops <= max_flops) and (max_params is None or cost.params <= max_params)
                and (check is None or check[1](candidate)))

    if fits(model, teacher_cost):
        model.kd_pruning = _record(shape, 0.0, settings, earlier, teacher_cost)
        return PruneResult(model, 0.0, teacher_cost, teacher_cost, model.kd_pruning)
    groups = _prunable_groups(model, shape, label)
    lo, hi = 0.0, 1.0
    best: tuple[float, nn.Module, list, Cost] | None = None
    lowest: Cost | None = None  # the smallest non-fitting trial: what "cannot reach" reports
    collapsed: list[str] = []
    while hi - lo > RATIO_TOLERANCE:
        mid = (lo + hi) / 2
        try:
            pruned, history = _trial(model, mid, shape, settings, calibration, label, groups)
        except _Collapse as err:
            hi, collapsed = mid, err.layers
            continue
        cost = measure(pruned, shape)
        if fits(pruned, cost):
            hi, best = mid, (mid, pruned, history, cost)
        else:
            lo, lowest = mid, cost
    if best is None:
        limit = " and ".join(x for x in (
            f"{max_flops / 1e6:.3g} MFLOPs" if max_flops is not None else "",
            f"{max_params / 1e6:.3g} M params" if max_params is not None else "",
            check[0] if check is not None else "") if x)
        reached = lowest or teacher_cost
        why = (f"pruning more would remove every channel of {_few(collapsed)}" if collapsed else
               f"every prunable layer is down to {settings.round_to} channels or kept whole")
        raise UserError(
            f"pruning {label} cannot reach {limit}: at ratio {lo:.3f} it still has {reached.flops / 1e6:.3g} MFLOPs "
            f"and {reached.params / 1e6:.3g} M params, and {why}; going lower means removing whole layers or "
            "stages, which channel pruning does not do: give a larger budget or use a zoo student")
    ratio, pruned, history, cost = best
    pruned.kd_pruning = _record(shape, ratio, settings, earlier + history, teacher_cost)
    return PruneResult(pruned.eval(), ratio, cost, teacher_cost, pruned.kd_pruning)


def classifier_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer whose outputs are the classes: zoo models name it, else the last Linear."""
    modules = dict(model.named_modules())
    named = getattr(model, "classifier_name", None)
    if named and named in modules:
        return named, modules[named]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _prunable_groups(model: nn.Module, shape: tuple[int, ...], label: str) -> dict[str, int]:
    """Root layer name -> channel count of every group Torch-Pruning may prune (classifier excluded)."""
    tp = _tp()
    probe = copy.deepcopy(model).eval()
    head = classifier_of(probe)
    names = {m: n for n, m in probe.named_modules()}
    with _LastLayer(probe) as where, torch.enable_grad():  # the graph is traced through autograd
        try:
            graph = tp.DependencyGraph().build_dependency(probe, torch.zeros(1, *shape))
            groups = list(graph.get_all_groups(ignored_layers=[head[1]] if head else []))
        except Exception as err:  # noqa: BLE001 - tracing runs the user's model: any failure is its graph
            raise UserError(f"cannot prune {label}: tracing its graph failed{where.text()} "
                            f"({type(err).__name__}: {_short(str(err))})") from None
    found = {}
    for group in groups:
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if root in names and channels:
            found[names[root]] = int(channels)
    if not found:
        raise UserError(f"cannot prune {label}: Torch-Pruning finds no convolution or linear layer it can prune "
                        "besides the classifier")
    return found


def _trial(model: nn.Module, ratio: float, shape: tuple[int, ...], settings: PruneSettings,
           calibration: tuple[torch.Tensor, torch.Tensor] | None, label: str,
           groups: dict[str, int] | None = None) -> tuple[nn.Module, list]:
    """Prune a deep copy at ``ratio``; (model, history). Raises _Collapse or a UserError.

    A group never goes below ``round_to`` channels: with ``layer`` scope its ratio is capped so
    ``int(C * (1 - r))`` stays at ``round_to`` (rounding down would otherwise empty it), and a group
    of ``round_to`` channels or fewer is left whole in either scope.
    """
    tp = _tp()
    groups = groups if groups is not None else _prunable_groups(model, shape, label)
    trial = copy.deepcopy(model).eval()
    modules = dict(trial.named_modules())
    head = classifier_of(trial)
    rt = settings.round_to
    caps = {name: (channels - rt - 0.5) / channels for name, channels in groups.items()}
    ignored = ([head[1]] if head else []) + [modules[n] for n, cap in caps.items() if cap <= 0]
    per_layer = None
    if settings.scope == "layer":
        per_layer = {modules[n]: min(ratio, cap) for n, cap in caps.items() if cap > 0}
    example = torch.zeros(1, *shape)
    spec = IMPORTANCES[settings.importance]
    with _LastLayer(trial) as where, torch.enable_grad():  # the graph is traced through autograd
        try:
            pruner = tp.pruner.MetaPruner(
                trial, example, importance=spec.factory(), global_pruning=settings.scope == "global",
                pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=ignored, round_to=rt)
        except Exception as err:  # noqa: BLE001 - tracing runs the user's model: any failure is its graph
            raise UserError(f"cannot prune {label}: tracing its graph failed{where.text()} "
                            f"({type(err).__name__}: {_short(str(err))})") from None
    collapsed = _watch_collapse(pruner, trial)
    if spec.needs_gradients:
        x, y = calibration
        trial.zero_grad()
        nn.functional.cross_entropy(trial(x), y).backward()
    try:
        with torch.enable_grad():
            pruner.step()
    except Exception as err:  # noqa: BLE001 - a layer type Torch-Pruning cannot handle
        raise UserError(f"cannot prune {label}: Torch-Pruning failed ({type(err).__name__}: {_short(str(err))})") from None
    if collapsed:
        raise _Collapse(sorted(set(collapsed)))
    trial.zero_grad(set_to_none=True)
    _check_forward(trial, example, label)
    history = [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()]
    return trial, history


def _watch_collapse(pruner: Any, model: nn.Module) -> list[str]:
    """Names of groups the pruner skipped because they would lose every channel.

    Torch-Pruning's ``check_pruning_group`` returns False exactly then and the group is silently
    left whole: at a high ratio that makes cost jump back up. We record it instead, so the
    bisection treats the ratio as too strong.
    """
    found: list[str] = []
    graph = pruner.DG
    original = graph.check_pruning_group
    names = {m: n for n, m in model.named_modules()}

    def check(group) -> bool:
        ok = original(group)
        if not ok:
            root = group[0].dep.target.module
            found.append(names.get(root, type(root).__name__))
        return ok

    graph.check_pruning_group = check
    return found


def _check_forward(model: nn.Module, example: torch.Tensor, label: str) -> None:
    """A graph Torch-Pruning misread (a hard-coded view, a custom op) fails here: name the layer."""
    with _LastLayer(model) as where, torch.no_grad():
        try:
            model(example)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot prune {label}: the pruned graph fails{where.text()} "
                            f"({type(err).__name__}: {_short(str(err))}); its channels are used in a way "
                            "Torch-Pruning cannot follow") from None


class _LastLayer:
    """Forward hooks that remember the last layer entered, to name where a forward failed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.name: str | None = None
        self.handles: list = []

    def __enter__(self) -> "_LastLayer":
        for name, module in self.model.named_modules():
            if name and not list(module.children()):
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
        return self

    def _enter(self, name: str):
        def hook(_module, _inputs):
            self.name = name
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def text(self) -> str:
        return f" at or after layer {self.name}" if self.name else " before its first layer"


def _record(shape: tuple[int, ...], ratio: float, settings: PruneSettings, history: list,
            teacher_cost: Cost) -> dict[str, Any]:
    return {
        "tool": TOOL, "tool_version": str(getattr(_tp(), "__version__", "?")),
        "input_shape": list(shape), "ratio": float(ratio), "importance": settings.importance,
        "scope": settings.scope, "round_to": int(settings.round_to), "history": history,
        "teacher_flops": int(teacher_cost.flops), "teacher_params": int(teacher_cost.params),
    }


def replay(model: nn.Module, record: dict[str, Any], where: str = "the checkpoint") -> nn.Module:
    """Re-apply a saved pruning history to a fresh (unpruned) model, in place; returns it.

    Every way the history can fail to fit the architecture is one UserError.
    """
    history = record.get("history") if isinstance(record, dict) else None
    shape = record.get("input_shape") if isinstance(record, dict) else None
    arch = getattr(model, "kd_arch", type(model).__name__)
    bad = f"{where} is a pruned {arch} whose pruning history does not fit the architecture"
    if not isinstance(history, list) or not isinstance(shape, (list, tuple)) or not shape:
        raise UserError(f"{bad}: the history record is missing or malformed")
    modules = dict(model.named_modules())
    for entry in history:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[2], (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in entry[2])):
            raise UserError(f"{bad}: malformed entry {_short(repr(entry), 80)}")
        if entry[0] not in modules:
            raise UserError(f"{bad}: it prunes layer {entry[0]!r}, which {arch} does not have")
    tp = _tp()
    try:
        with torch.enable_grad():  # a caller's no_grad would stop the tracing
            graph = tp.DependencyGraph().build_dependency(model.eval(), torch.zeros(1, *[int(s) for s in shape]))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{bad}: tracing {arch} at input {list(shape)} failed ({type(err).__name__}: "
                        f"{_short(str(err))})") from None
    # Torch-Pruning's load_pruning_history, step by step, so an index that does not exist is named
    # (Torch-Pruning would silently skip it and leave a model the weights do not fit)
    for step, (name, out, idxs) in enumerate(history, 1):
        layer = modules[name]
        handler = graph.get_pruner_of_module(layer)
        if handler is None:
            raise UserError(f"{bad}: step {step} prunes {name}, a {type(layer).__name__} Torch-Pruning cannot prune")
        channels = handler.get_out_channels(layer) if out else handler.get_in_channels(layer)
        if channels is None or (idxs and max(idxs) >= channels) or len(set(idxs)) >= channels:
            raise UserError(f"{bad}: step {step} removes {'output' if out else 'input'} channels "
                            f"{_few([str(i) for i in sorted(idxs, reverse=True)])} of {name}, which has {channels}")
        try:
            fn = handler.prune_out_channels if out else handler.prune_in_channels
            graph.get_pruning_group(layer, fn, list(idxs)).prune(record_history=False)
        except Exception as err:  # noqa: BLE001 - a layer of the wrong kind, ...
            raise UserError(f"{bad}: step {step} on {name} failed ({type(err).__name__}: {_short(str(err))})") from None
    model.kd_pruning = dict(record)
    return model


def describe(record: dict[str, Any] | None) -> str:
    """One line for reports: ratio, criterion, scope."""
    if not record:
        return "unpruned"
    return (f"pruned {record.get('ratio', 0):.3f} of channels per group ({record.get('importance')}, "
            f"{record.get('scope')} scope, multiples of {record.get('round_to')})")


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
