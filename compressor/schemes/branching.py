"""Split a classifier into a shared trunk and a head that can be replicated (ONE, PCL).

ONE (Lan et al., NeurIPS 2018) and PCL (Wu & Gong, AAAI 2021) train a *multi-branch* network:
the low layers are shared, the high layers are copied into K branches, and each branch with the
shared layers is one peer. For a CIFAR ResNet the branch is the last stage (``layer3``), the
pooling and the classifier, exactly as both papers build theirs.

What "branchable" means here, for ANY model (zoo or not), without rewriting it:

1. it has at least two stages and a classifier (declared by zoo models, otherwise found by the
   feature-tap dry run, :func:`compressor.features.discover_stages`);
2. ``torch.fx`` can trace its ``forward`` with the stem, the stages and the classifier kept as
   opaque calls (so blocks with Python control flow inside are fine);
3. the last stage is called exactly once, on one tensor that the earlier layers computed, and
   every operation after it reads only what the last stage produced (no skip connection from
   earlier layers into the head).

Then the trunk is everything up to the last stage's input and the head is the last stage with
everything after it. Both are ``fx.GraphModule`` s that keep the original module names, so
``trunk.state_dict()`` plus one head's ``state_dict()`` is the state of ONE plain model of the
original architecture: that is how a branch is exported (:meth:`Split.assemble`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from compressor.errors import UserError
from compressor.features import discover_stages


class NotBranchable(UserError):
    """The model cannot be split into a shared trunk and replicable branches; says why."""


class _StageLeafTracer(fx.Tracer):
    """Traces through everything except the named stem/stages/classifier, kept as single calls."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


@dataclass
class Split:
    """A model cut at its last stage: ``head(trunk(x)) == model(x)``, sharing the model's modules."""

    trunk: fx.GraphModule
    head: fx.GraphModule
    stem_name: str | None
    trunk_stage_names: tuple[str, ...]  # stages that stay in the trunk, shallow -> deep
    last_stage: str
    classifier_name: str

    def assemble(self, factory: Callable[[], nn.Module], head: nn.Module | None = None) -> nn.Module:
        """A fresh plain model from ``factory`` holding the trunk's weights and ``head``'s (default: own)."""
        model = factory()
        state = {**self.trunk.state_dict(), **(head if head is not None else self.head).state_dict()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"branch weights do not fit {type(model).__name__}: unexpected {unexpected[:3]}")
        return model  # keys in `missing` belong to modules the forward never calls


def _stage_layout(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[str | None, list[str], str]:
    stages = getattr(model, "stage_names", None)
    classifier = getattr(model, "classifier_name", None)
    stem = getattr(model, "stem_name", None)
    if stages is None or classifier is None:
        if input_shape is None:
            raise NotBranchable(f"{type(model).__name__} declares no stages; give an input shape to find them")
        found, found_classifier = discover_stages(model, input_shape)
        stages = stages if stages is not None else found
        classifier = classifier if classifier is not None else found_classifier
    return stem, list(stages), classifier


def split_model(model: nn.Module, input_shape: Sequence[int] | None = None) -> Split:
    """Cut ``model`` into trunk and head, or raise :class:`NotBranchable` with the reason."""
    name = getattr(model, "kd_arch", type(model).__name__)
    stem, stages, classifier = _stage_layout(model, input_shape)
    if len(stages) < 2:
        raise NotBranchable(
            f"{name} cannot be branched: it has {len(stages)} stage(s), and branches need at least one stage "
            "to share and one to replicate"
        )
    last = stages[-1]
    leaves = {s for s in (stem, *stages, classifier) if s}
    try:
        graph = _StageLeafTracer(leaves).trace(model)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, NotImplementedError ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")[:120]
        raise NotBranchable(
            f"{name} cannot be branched: torch.fx cannot trace its forward, which needs concrete values or "
            f"shapes ({first}); "
            "use a cohort aggregator that keeps whole peers (dml, attention, fc, wavg)"
        ) from None
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == last]
    if len(calls) != 1:
        raise NotBranchable(f"{name} cannot be branched: its last stage {last!r} runs {len(calls)} times per forward")
    stage_call = calls[0]
    if len(stage_call.args) != 1 or stage_call.kwargs or not isinstance(stage_call.args[0], fx.Node):
        raise NotBranchable(f"{name} cannot be branched: its last stage {last!r} does not take one tensor")
    cut = stage_call.args[0]
    if cut.op == "placeholder":
        raise NotBranchable(f"{name} cannot be branched: its last stage {last!r} reads the input, nothing is shared")

    head_nodes: set[fx.Node] = set()
    for n in nodes:
        if n is stage_call or any(a in head_nodes for a in n.all_input_nodes):
            head_nodes.add(n)
    output = next(n for n in nodes if n.op == "output")
    if output not in head_nodes:
        raise NotBranchable(f"{name} cannot be branched: its output does not depend on its last stage {last!r}")
    for n in head_nodes:
        if n is stage_call:
            continue
        for a in n.all_input_nodes:
            if a not in head_nodes and a.op != "get_attr":
                raise NotBranchable(
                    f"{name} cannot be branched: layers after its last stage {last!r} also read {a.name!r}, "
                    "computed before it (a skip connection into the head)"
                )

    trunk_graph = fx.Graph()
    needed = _ancestors(cut)
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in needed:
            env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    trunk_graph.output(env[cut])

    head_graph = fx.Graph()
    env = {cut: head_graph.placeholder("h")}
    for n in nodes:
        if n in head_nodes:
            for a in n.all_input_nodes:
                if a not in env:  # a constant or parameter read by the head (get_attr)
                    env[a] = head_graph.node_copy(a, lambda b: env[b])
            env[n] = head_graph.node_copy(n, lambda a: env[a])

    trunk = fx.GraphModule(model, trunk_graph, class_name="Trunk")
    head = fx.GraphModule(model, head_graph, class_name="Head")
    trunk_stages = tuple(s for s in stages[:-1])
    return Split(trunk, head, stem, trunk_stages, last, classifier)


def why_not_branchable(model: nn.Module, input_shape: Sequence[int] | None = None) -> str | None:
    """None when :func:`split_model` works on ``model``, else the one-line reason."""
    try:
        split_model(model, input_shape)
    except NotBranchable as err:
        return str(err)
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen
