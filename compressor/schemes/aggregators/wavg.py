"""Learnable weighted average of the peers (ModReduce's "Weighted Averaging", Sec. 3.3.4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.schemes.aggregators.base import Aggregate, Aggregator, register_aggregator
from compressor.schemes.peers import CohortInfo, GroupOutputs


@register_aggregator("wavg")
class WeightedAverage(Aggregator):
    """``z_e = sum_i w_i z_i`` with ``w = softmax(theta)``: each weight in [0, 1], summing to 1.

    ModReduce: one learnable weight per student, "from 0 to 1 and having a total sum of 1 ...
    optimized based on students' performance". The softmax keeps ``w`` on the simplex whatever
    the optimiser does to ``theta`` (initialised to 0: equal weights). ``theta`` learns from
    ``CE(z_e, y)`` computed on DETACHED student logits, so that term rates the students and moves
    only the weights; the students follow ``p_e`` (detached) through ``w T^2 KL(p_e || p_i)``.
    T = 4 is ModReduce's temperature.
    """

    default_temperature = 4.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0) -> None:
        super().__init__(info, temperature, kd_weight)
        self.theta = nn.Parameter(torch.zeros(info.num_peers))

    @property
    def weights(self) -> Tensor:
        return torch.softmax(self.theta, dim=0)

    def _combine(self, logits: list[Tensor]) -> Tensor:
        stacked = torch.stack(logits, dim=1)  # (N, peers, C)
        return (self.weights.to(stacked.dtype)[None, :, None] * stacked).sum(dim=1)

    def ensemble(self, out: GroupOutputs) -> Tensor:
        return self._combine([p.logits for p in out.peers])

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        z_e = self._combine([p.logits.detach() for p in out.peers])
        kd = self.distill([p.logits for p in out.peers], z_e)
        return Aggregate(z_e, {"weights_ce": F.cross_entropy(z_e, y), "kd": self.kd_weight * kd})
