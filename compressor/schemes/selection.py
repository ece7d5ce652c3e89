"""Choosing the one deployable model of a multi-model scheme on the validation split.

Cohorts and ModReduce train several students; one is deployed. :class:`PeerSelection` keeps
the choice (the best validation top-1 seen so far, as a buffer so a resumed run keeps it) and
exports it; :class:`EnsembleView` lets the trainer report a label-free ensemble's accuracy next
to the peers'. The trainer calls ``observe_validation`` after each epoch's validation.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from compressor.schemes.aggregators import Aggregator
from compressor.schemes.peers import PeerGroup


class EnsembleView(nn.Module):
    """The aggregator's label-free ensemble as a model ``x -> logits``, to report its accuracy.

    Not part of the scheme's module tree; ``train``/``eval`` reach the peers and the aggregator,
    whose frozen parts (temporal means) stay in eval mode.
    """

    def __init__(self, group: PeerGroup, aggregator: Aggregator) -> None:
        super().__init__()
        self.__dict__["_group"] = group
        self.__dict__["_aggregator"] = aggregator

    @property
    def training(self) -> bool:  # type: ignore[override]
        group = self.__dict__.get("_group")
        return group.training if group is not None else True

    @training.setter
    def training(self, _mode: bool) -> None:
        pass

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.__dict__["_group"].parameters(recurse)

    def train(self, mode: bool = True) -> "EnsembleView":
        aggregator: Aggregator = self.__dict__["_aggregator"]
        self.__dict__["_group"].train(mode)
        aggregator.train(mode)
        for module in aggregator.frozen_modules():
            module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.__dict__["_aggregator"].ensemble(self.__dict__["_group"](x))


class PeerSelection:
    """Mixin: deployable candidates scored on validation; the best one so far is exported.

    The trainer reports every candidate's validation top-1 through :meth:`observe_validation`
    after each epoch; the candidate with the best accuracy seen so far (the first on ties) is
    the one :meth:`deployable` exports, and its name is what the epoch is ranked by. The choice is
    a buffer, so a resumed run keeps it. The test split never takes part.
    """

    def _init_selection(self) -> None:
        self.register_buffer("chosen_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("chosen_top1", torch.full((), -math.inf, dtype=torch.float64))

    def candidate_names(self) -> list[str]:
        raise NotImplementedError

    def export_candidate(self, name: str) -> nn.Module:
        raise NotImplementedError

    @property
    def chosen(self) -> str:
        names = self.candidate_names()
        return names[min(int(self.chosen_index.item()), len(names) - 1)]

    def observe_validation(self, top1: Mapping[str, float]) -> str:
        """Take this epoch's validation top-1 per model name; return the candidate that stands for it."""
        names = self.candidate_names()
        scored = [(float(top1[n]), -i, n) for i, n in enumerate(names)
                  if n in top1 and top1[n] is not None and math.isfinite(float(top1[n]))]
        if scored:
            acc, neg_index, _ = max(scored)
            if acc > float(self.chosen_top1.item()):
                self.chosen_index.fill_(-neg_index)
                self.chosen_top1.fill_(acc)
        return self.chosen

    def deployable(self) -> nn.Module:
        return self.export_candidate(self.chosen)
