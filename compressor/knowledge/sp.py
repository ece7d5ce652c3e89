"""Similarity-preserving distillation (Tung & Mori, ICCV 2019).

Inputs that the teacher maps to similar activations should be mapped to similar activations by
the student too; only the b x b pairwise-similarity pattern is matched, so the two networks'
channels and spatial sizes never need to agree.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs
from compressor.knowledge._relational import flat32, full_precision
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def similarity_matrix(maps: Tensor) -> Tensor:
    """Row-normalised batch Gram matrix of flattened maps (Tung & Mori, Eq. 1-2).

    Q is the (b, c*h*w) reshaped activation map; G~ = Q Q^T; G[i, :] = G~[i, :] / ||G~[i, :]||_2.
    """
    q = flat32(maps)
    return F.normalize(q @ q.t(), p=2, dim=1)


@register_loss("sp", "relation")
class SimilarityPreserving(KnowledgeLoss):
    """L_SP = 1/b^2 * ||G_T - G_S||_F^2 on the last stage's maps (Tung & Mori, Eq. 3).

    ``stage`` picks the tapped stage (default -1, the last one, as in the paper's CIFAR setup
    and RepDistiller). The total loss is L_CE + gamma * L_SP (Eq. 4); gamma = 3000 is
    RepDistiller's setting for CIFAR-100 (train_student.py ``-b 3000``).
    """

    default_weight: ClassVar[float] = 3000.0

    def __init__(self, ctx: LossContext, stage: int = -1) -> None:
        super().__init__(ctx)
        for side, layout in (("student", ctx.student), ("teacher", ctx.teacher)):
            n = len(layout.stages)
            if not -n <= stage < n:
                raise UserError(f"sp: stage {stage} does not exist; the {side} has {n} stages")
        self.stage = stage

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        fs, ft = student.features[self.stage], teacher.features[self.stage].detach()
        b = fs.shape[0]
        with full_precision(fs.device):
            diff = similarity_matrix(ft) - similarity_matrix(fs)
            return diff.pow(2).sum() / (b * b)
