"""Vanilla knowledge distillation on softened logits (Hinton, Vinyals & Dean, 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import ModelOutputs
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, averaged over the batch.

    The teacher side is detached: it is a target, never trained through this term.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


@register_loss("hinton", "response")
class HintonLoss(KnowledgeLoss):
    """Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, Sec. 2.

    ``L = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch-averaged. The ``T^2`` factor
    (Sec. 2, last paragraph) keeps the gradient scale independent of ``T``. ``T = 4`` is the
    CRD benchmark's (Tian et al. 2020, RepDistiller) CIFAR setting. Weights as RepDistiller's
    scripts/run_cifar_distill.sh runs KD: alone, KD 0.9 and cross-entropy 0.1 (the KD row,
    ``--distill kd -r 0.1 -a 0.9 -b 0``); next to another method, KD 1 and CE 1 (CRD+KD,
    ``--distill crd -a 1 -b 0.8`` with ``-r`` at its default 1; SemCKD's scripts run ``-a 1``
    too, as does ModReduce). :mod:`compressor.knowledge.spec` applies them.
    """

    default_weight = 0.9  # RepDistiller's KD row, -a 0.9
    combined_weight = 1.0  # -a 1 next to CRD (and SemCKD)
    ce_weight_alone = 0.1  # the KD row's -r 0.1

    def __init__(self, ctx: LossContext, temperature: float = 4.0) -> None:
        super().__init__(ctx)
        if temperature <= 0:
            raise ValueError("hinton: temperature must be positive")
        self.temperature = float(temperature)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        return soft_kl(student.logits, teacher.logits, self.temperature) * self.temperature**2
