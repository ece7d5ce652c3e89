"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import ModelOutputs
from compressor.knowledge._stages import match_by_depth, pool_pair
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def attention_map(feature: Tensor, p: float) -> Tensor:
    """Q = mean_c |A_c|^p, flattened and L2-normalised per sample (the paper's F^p_mean, Sec. 3.1)."""
    q = feature.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1)


@register_loss("at", "feature")
class AttentionTransferLoss(KnowledgeLoss):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, Eq. 2.

    For each matched stage pair: ``|| Q_s/||Q_s|| - Q_t/||Q_t|| ||^2`` averaged over positions
    and samples, summed over pairs. The squared, averaged form and weight ``beta = 1000`` are
    RepDistiller's (the paper writes the un-squared p-norm with beta/2; the weight is tuned for
    this form). Stage matching: every stage pair at the same relative depth
    (:func:`match_by_depth`; equal counts pair i with i). A spatial mismatch adaptive-pools
    the larger map to the smaller one before the attention map is taken. Channels never need
    to agree (the map averages them away), so AT has no learnable parts.
    """

    default_weight = 1000.0

    def __init__(self, ctx: LossContext, p: float = 2.0) -> None:
        super().__init__(ctx)
        self.p = float(p)
        self.pairs = match_by_depth(len(ctx.student.stages), len(ctx.teacher.stages))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        total = 0.0
        for i, j in self.pairs:
            f_s, f_t = pool_pair(student.features[i], teacher.features[j].detach())
            total = total + (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
        return total
