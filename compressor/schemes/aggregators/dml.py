"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from compressor.knowledge.hinton import soft_kl
from compressor.schemes.aggregators.base import Aggregate, Aggregator, mean_probabilities, register_aggregator
from compressor.schemes.peers import GroupOutputs


@register_aggregator("dml")
class DeepMutualLearning(Aggregator):
    """Each peer mimics every other: ``L_k += 1/(K-1) sum_{l != k} KL(p_l || p_k)`` (DML Eq. 10).

    There is no teacher: every peer is the others' teacher. DML updates the networks in turn,
    each against the others' current predictions, so a peer's targets are constants for its own
    update; here all peers step together and the targets ``p_l`` are detached, which gives each
    peer exactly the gradient of its own DML objective. Temperature 1 as in the paper (a ``T``
    other than 1 scales the term by ``T^2``). The reported "ensemble" is the mean of the peers'
    probabilities (logged only; nothing is trained towards it).
    """

    default_temperature = 1.0

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        logits = [p.logits for p in out.peers]
        k = len(logits)
        t = self.temperature
        total = logits[0].new_zeros((), dtype=torch.float32)
        for i, z_i in enumerate(logits):
            for j, z_j in enumerate(logits):
                if i != j:
                    total = total + soft_kl(z_i, z_j, t) / (k - 1)
        return Aggregate(self.ensemble(out), {"mutual": self.kd_weight * (t * t) * total})

    def ensemble(self, out: GroupOutputs) -> Tensor:
        return mean_probabilities([p.logits.detach() for p in out.peers]).clamp_min(1e-12).log()
