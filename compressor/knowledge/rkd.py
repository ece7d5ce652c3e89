"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

The student matches the *structure* of the teacher's embedding space over a batch: pairwise
distances (RKD-D) and angles of triples (RKD-A), both invariant to the embeddings' dimension,
so any teacher/student pair works. Three registered terms: ``rkd_d``, ``rkd_a`` and ``rkd_da``
(both, as RepDistiller's ``rkd``). The inner weights w_d = 25, w_a = 50 are RepDistiller's
(distiller_zoo/RKD.py); the term weight is 1 (train_student.py ``-b 1``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import ModelOutputs
from compressor.knowledge._relational import flat32, full_precision, pairwise_distances, triplet_cosines
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def distance_potential(e: Tensor) -> Tensor:
    """psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu, mu = mean distance over pairs i != j (Eq. 3)."""
    d = pairwise_distances(e)
    b = e.shape[0]
    mu = d.sum() / max(b * (b - 1), 1)
    return d / mu.clamp_min(1e-12)


def angle_potential(e: Tensor) -> Tensor:
    """psi_A(t_i, t_j, t_k) = cos angle t_i t_j t_k = <e^ij, e^kj> (Eq. 6)."""
    return triplet_cosines(e)


def rkd_distance_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """L_RKD-D = mean over pairs of l_delta(psi_D(t), psi_D(s)), Huber with delta = 1 (Eq. 4-5)."""
    with torch.no_grad():
        target = distance_potential(ft)
    return F.smooth_l1_loss(distance_potential(fs), target)


def rkd_angle_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """L_RKD-A = mean over triples of l_delta(psi_A(t), psi_A(s)) (Eq. 7)."""
    with torch.no_grad():
        target = angle_potential(ft)
    return F.smooth_l1_loss(angle_potential(fs), target)


class _RKD(KnowledgeLoss):
    """w_d * L_RKD-D + w_a * L_RKD-A on the pooled embeddings; subclasses zero one weight."""

    default_weight: ClassVar[float] = 1.0
    uses_distance: ClassVar[bool] = True
    uses_angle: ClassVar[bool] = True

    def __init__(self, ctx: LossContext, w_d: float = 25.0, w_a: float = 50.0) -> None:
        super().__init__(ctx)
        self.w_d = w_d if self.uses_distance else 0.0
        self.w_a = w_a if self.uses_angle else 0.0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        fs = student.embedding
        with full_precision(fs.device):
            fs, ft = flat32(fs), flat32(teacher.embedding.detach())
            loss = fs.new_zeros(())
            if self.w_d:
                loss = loss + self.w_d * rkd_distance_loss(fs, ft)
            if self.w_a:
                loss = loss + self.w_a * rkd_angle_loss(fs, ft)
            return loss


@register_loss("rkd_d", "relation")
class RKDDistance(_RKD):
    """Distance-wise RKD only: w_d * L_RKD-D (Park et al., Eq. 3-5)."""

    uses_angle = False


@register_loss("rkd_a", "relation")
class RKDAngle(_RKD):
    """Angle-wise RKD only: w_a * L_RKD-A (Park et al., Eq. 6-7)."""

    uses_distance = False


@register_loss("rkd_da", "relation")
class RKDDistanceAngle(_RKD):
    """Both terms, w_d * L_RKD-D + w_a * L_RKD-A (Park et al., Eq. 8's KD part)."""
