"""A group of peers trained together: whole separate networks, or branches over one shared trunk.

Cohort schemes and ModReduce see their students only through :class:`PeerGroup`: one forward
gives every peer's :class:`ModelOutputs` (logits, stage maps, embedding), each peer can be
evaluated on its own (:meth:`PeerGroup.peer`, a live view sharing the weights) and exported
alone as a plain model of its architecture (:meth:`PeerGroup.export`), which is what deploys.

* :class:`SeparatePeers`: N independent models (same or different architectures): DML, the
  attention ensemble, FC, weighted average, ModReduce's students.
* :class:`BranchedPeers`: ONE / PCL's multi-branch network: the trunk runs once per batch and K
  heads (last stage + classifier, see :mod:`compressor.schemes.branching`) run on its output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from compressor.features import FeatureTaps, ModelOutputs
from compressor.schemes.branching import Split, split_model
from compressor.threads import one_thread


@dataclass
class GroupOutputs:
    """What one forward of a peer group produced for one batch."""

    peers: list[ModelOutputs]
    x: Tensor  # the input batch (a gate may read it)
    shared: Tensor | None = None  # the shared trunk's output, when the peers share one

    def stacked_logits(self) -> Tensor:
        """(N, peers, classes)."""
        return torch.stack([p.logits for p in self.peers], dim=1)


@dataclass(frozen=True)
class CohortInfo:
    """What an aggregator needs to size itself, known before training."""

    num_peers: int
    num_classes: int
    input_shape: tuple[int, int, int]
    embedding_dims: tuple[int, ...]
    shared_channels: int | None  # channels of the shared trunk output; None when nothing is shared


class PeerGroup(nn.Module):
    """Base: subclasses implement forward, peer, export, clone and describe their peers."""

    shares_trunk: bool = False

    def __len__(self) -> int:
        return len(self.names)

    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> GroupOutputs:  # pragma: no cover - abstract
        raise NotImplementedError

    def peer(self, i: int) -> nn.Module:
        """Peer ``i`` as a model ``x -> logits`` that shares the group's weights (for evaluation)."""
        raise NotImplementedError

    def export(self, i: int) -> nn.Module:
        """Peer ``i`` as a standalone plain model with a copy of its weights (the deployable)."""
        raise NotImplementedError

    def clone(self) -> "PeerGroup":
        """An independent copy with the same weights (temporal-mean teachers start from it)."""
        raise NotImplementedError

    def info(self, num_classes: int, input_shape: Sequence[int]) -> CohortInfo:
        """Sizes from one no-grad forward of one zero sample in eval mode (no BN statistic moves)."""
        shape = tuple(int(s) for s in input_shape)
        param = next(self.parameters())
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), one_thread():
                out = self(torch.zeros(1, *shape, device=param.device))
        finally:
            self.train(was_training)
        dims = tuple(int(p.embedding.shape[1]) for p in out.peers)
        shared = int(out.shared.shape[1]) if out.shared is not None else None
        return CohortInfo(len(out.peers), num_classes, shape, dims, shared)


class SeparatePeers(PeerGroup):
    """N whole models; each keeps its own feature taps."""

    def __init__(self, models: Sequence[nn.Module], input_shape: Sequence[int] | None = None,
                 names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._names = list(names) if names is not None else [f"peer{i}" for i in range(len(models))]
        self._taps = [FeatureTaps(m, self.input_shape) for m in self.models]

    @property
    def names(self) -> list[str]:
        return self._names

    def forward(self, x: Tensor) -> GroupOutputs:
        return GroupOutputs([tap(x) for tap in self._taps], x)

    def peer(self, i: int) -> nn.Module:
        return self.models[i]

    def export(self, i: int) -> nn.Module:
        return plain_copy(self.models[i])

    def clone(self) -> "SeparatePeers":
        return SeparatePeers([plain_copy(m) for m in self.models], self.input_shape, self._names)


class _BranchView(nn.Module):
    """trunk -> one head: a peer of a branched group for evaluation, sharing the group's weights.

    It is kept out of the scheme's module tree (so no weight is registered twice); its mode is
    its head's, and ``train``/``eval`` reach the shared trunk and its head.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self.head.training if "head" in self._modules else True

    @training.setter
    def training(self, _mode: bool) -> None:
        pass  # the mode lives in the trunk and head modules

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class BranchedPeers(PeerGroup):
    """K branches over one trunk (ONE, PCL): trunk computed once, each head on its output.

    Every branch is initialised independently (its own fresh model from ``factory``), as if K
    models were built and their low layers merged into the first one's; otherwise identical
    branches would receive identical gradients and never differ.
    """

    shares_trunk = True

    def __init__(self, factory: Callable[[], nn.Module], num_branches: int,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if num_branches < 1:
            raise ValueError("a branched network needs at least one branch")
        self._factory = factory
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        splits = [split_model(factory(), self.input_shape) for _ in range(num_branches)]
        self._split: Split = splits[0]
        self.trunk = splits[0].trunk
        self.heads = nn.ModuleList(s.head for s in splits)
        self._attach_taps()

    def _attach_taps(self) -> None:
        split = self._split
        self._trunk_maps: dict[str, Tensor] = {}
        modules = dict(self.trunk.named_modules())
        self._trunk_handles = []
        for name in (*split.trunk_stage_names, *([split.stem_name] if split.stem_name else [])):
            self._trunk_handles.append(modules[name].register_forward_hook(self._keep(name)))
        self._head_taps = [
            FeatureTaps(h, stage_names=[split.last_stage], classifier_name=split.classifier_name, stem_name="")
            for h in self.heads
        ]
        self._views = [_BranchView(self.trunk, h) for h in self.heads]

    def _keep(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self._trunk_maps[name] = output

        return hook

    @property
    def names(self) -> list[str]:
        return [f"branch{i}" for i in range(len(self.heads))]

    def forward(self, x: Tensor) -> GroupOutputs:
        self._trunk_maps = {}
        shared = self.trunk(x)
        maps = [self._trunk_maps[n] for n in self._split.trunk_stage_names]
        stem = self._trunk_maps.get(self._split.stem_name) if self._split.stem_name else None
        self._trunk_maps = {}
        peers = []
        for tap in self._head_taps:
            out = tap(shared)
            peers.append(ModelOutputs(out.logits, maps + out.features, out.embedding, stem))
        return GroupOutputs(peers, x, shared)

    def peer(self, i: int) -> nn.Module:
        return self._views[i]

    def export(self, i: int) -> nn.Module:
        model = self._split.assemble(self._factory, self.heads[i])
        param = next(self.trunk.parameters())
        return model.to(param.device).train(self.training)

    def clone(self) -> "BranchedPeers":
        new = BranchedPeers.__new__(BranchedPeers)
        nn.Module.__init__(new)
        new._factory = self._factory
        new.input_shape = self.input_shape
        trunk, heads = plain_copy(self.trunk), plain_copy(self.heads)
        new._split = Split(trunk, heads[0], self._split.stem_name, self._split.trunk_stage_names,
                           self._split.last_stage, self._split.classifier_name)
        new.trunk, new.heads = trunk, heads
        new._attach_taps()
        return new


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy without any forward hooks (the copy must not feed the original's feature taps)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return new
