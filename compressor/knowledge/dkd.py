"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import ModelOutputs
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def _kl(p_target: Tensor, log_p_target: Tensor, log_p_student: Tensor) -> Tensor:
    """sum_c p_t (log p_t - log p_s), per sample."""
    return (p_target * (log_p_target - log_p_student)).sum(dim=1)


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each batch-averaged and multiplied by ``T^2`` (Zhao et al. Eq. 7).

    TCKD = KL(b_t || b_s) on the binary distribution b = [p_target, 1 - p_target];
    NCKD = KL(p̂_t || p̂_s) on the softmax over the non-target classes only.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    n, k = s.shape
    gt = F.one_hot(labels, k).bool()

    # binary target/non-target probabilities, in log space for stability
    log_p_s, log_p_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    log_b_s = torch.stack([log_p_s[gt], torch.logsumexp(log_p_s.masked_fill(gt, float("-inf")), dim=1)], dim=1)
    log_b_t = torch.stack([log_p_t[gt], torch.logsumexp(log_p_t.masked_fill(gt, float("-inf")), dim=1)], dim=1)
    tckd = _kl(log_b_t.exp(), log_b_t, log_b_s).mean()

    # distribution among the non-target classes (the target column removed)
    log_q_s = F.log_softmax(s[~gt].view(n, k - 1), dim=1)
    log_q_t = F.log_softmax(t[~gt].view(n, k - 1), dim=1)
    nckd = _kl(log_q_t.exp(), log_q_t, log_q_s).mean()
    return tckd * temperature**2, nckd * temperature**2


@register_loss("dkd", "response")
class DKDLoss(KnowledgeLoss):
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, Eq. 7: ``alpha*TCKD + beta*NCKD``.

    CIFAR-100 defaults from the paper / mdistiller: ``alpha = 1``, ``beta = 8``, ``T = 4``, CE
    weight 1 alongside. The paper warms the DKD weight up linearly over the first 20 epochs:
    the term is scaled by ``min(e / warmup, 1)`` with ``e`` the 1-based epoch. The epoch arrives
    through :meth:`set_epoch` (called by the scheme with a 0-based epoch); before any call the
    warm-up is not applied (scale 1), so the loss used on its own is the plain Eq. 7 value.
    """

    default_weight = 1.0

    def __init__(
        self,
        ctx: LossContext,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
    ) -> None:
        super().__init__(ctx)
        if temperature <= 0:
            raise ValueError("dkd: temperature must be positive")
        if ctx.student.num_classes < 2:
            raise ValueError("dkd: needs at least two classes")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = float(temperature)
        self.warmup = int(warmup)
        self.scale = 1.0

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        self.scale = min((epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        tckd, nckd = dkd_terms(student.logits, teacher.logits, batch.y, self.temperature)
        return self.scale * (self.alpha * tckd + self.beta * nckd)
