"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

The teacher's embedding space is summarised as a probability distribution over which samples
are neighbours of which; the student matches that distribution rather than the vectors, so the
two embedding dimensions are free.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from compressor.batch import Batch
from compressor.features import ModelOutputs
from compressor.knowledge._relational import flat32, full_precision
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def cosine_conditional_probabilities(e: Tensor, eps: float = 1e-7) -> Tensor:
    """p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k) with the cosine-similarity kernel.

    K(a, b) = (a^T b / (||a|| ||b||) + 1) / 2 (Passalis & Tefas, Sec. 3, cosine kernel), rows
    normalised to probabilities; the self-similarity is kept, as in the authors' code.
    """
    unit = e / (e.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@register_loss("pkt", "relation")
class ProbabilisticKnowledgeTransfer(KnowledgeLoss):
    """KL(P_teacher || P_student) of the conditional probabilities, averaged over b^2 entries.

    L = sum_i sum_j p_{j|i} log(p_{j|i} / q_{j|i}) (Passalis & Tefas, Sec. 3, the KL objective
    between the teacher's P and the student's Q), scaled by 1/b^2 as in the authors' code; on
    the pooled embeddings. Weight 30000 is RepDistiller's CIFAR-100 setting (``-b 30000``).
    """

    default_weight: ClassVar[float] = 30000.0

    def __init__(self, ctx: LossContext, eps: float = 1e-7) -> None:
        super().__init__(ctx)
        self.eps = eps

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        fs = student.embedding
        with full_precision(fs.device):
            q = cosine_conditional_probabilities(flat32(fs), self.eps)
            with torch.no_grad():
                p = cosine_conditional_probabilities(flat32(teacher.embedding.detach()), self.eps)
            return (p * torch.log((p + self.eps) / (q + self.eps))).mean()
