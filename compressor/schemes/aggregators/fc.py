"""A dense layer that aggregates the peers' logits (ModReduce, Sec. 3.3.3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.schemes.aggregators.base import Aggregate, Aggregator, register_aggregator
from compressor.schemes.peers import CohortInfo, GroupOutputs


@register_aggregator("fc")
class DenseAggregator(Aggregator):
    """``z_e = W [z_1; ...; z_N] + b``; ``L = CE(z_e, y) + w T^2 sum_i KL(p_e || p_i)``.

    ModReduce: "employing a dense layer to aggregate the three individual predictions into a
    single one", which the students follow. The layer starts as the plain average of the logits
    (W = [I/N ... I/N], b = 0) so the first targets are the mean ensemble, and learns from the
    cross-entropy of its output; as in ONE, that cross-entropy also reaches the peers. The
    students' targets ``p_e`` are detached. T = 4 is ModReduce's temperature.
    """

    default_temperature = 4.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0) -> None:
        super().__init__(info, temperature, kd_weight)
        n, c = info.num_peers, info.num_classes
        self.dense = nn.Linear(n * c, c)
        with torch.no_grad():
            self.dense.weight.copy_(torch.eye(c).repeat(1, n) / n)
            self.dense.bias.zero_()

    def ensemble(self, out: GroupOutputs) -> Tensor:
        return self.dense(torch.cat([p.logits for p in out.peers], dim=1))

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        z_e = self.ensemble(out)
        kd = self.distill([p.logits for p in out.peers], z_e)
        return Aggregate(z_e, {"ensemble_ce": F.cross_entropy(z_e, y), "kd": self.kd_weight * kd})
