"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

The student's and teacher's embeddings of the same image are a positive pair, of different
images a negative pair; a critic learnt by noise-contrastive estimation (NCE) tells them apart,
which maximises a lower bound on the mutual information between the two representations.
Negatives come from two memory banks (one per side) holding a momentum average of every
training sample's projected embedding, keyed on the sample's index in the training split.

Memory: the banks are stored in float16 (unit vectors, so 11 significant bits are plenty), at
``2 banks x feat_dim x 2 bytes`` = 512 bytes per training sample with feat_dim = 128 (the
authors' float32 banks take 1024). Scores are computed in float32. By default one draw of
negatives is shared by the whole batch (``shared_negatives=True``): the gathered negatives
then take K x feat_dim values instead of b x K x feat_dim (for b = 64, K = 16384, 8 MiB
instead of 512 MiB per side in float32) and the scores are one matrix product. Each sample's
negatives are still K uniform draws that never include its own index; set
``shared_negatives=False`` for the paper's independent draw per sample.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs
from compressor.knowledge._relational import full_precision
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ProjectionHead(nn.Module):
    """g(.) of the paper: a linear map to ``feat_dim`` followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


def nce_loss(scores: Tensor, log_z: Tensor, num_data: int, temperature: float) -> Tensor:
    """NCE loss for one anchor side; column 0 of ``scores`` (b, 1 + K) is the positive.

    With P = exp(s / tau) / Z (the critic's un-normalised probability, Z estimated once) and the
    uniform noise distribution P_n = 1 / N, the critic h = P / (P + K P_n) and the loss is
    -E[log h(positive)] - K E[log(1 - h(negative))] (Tian et al., Eq. 18 of the arXiv version,
    ContrastLoss in the authors' code), summed over the batch's negatives and divided by b.
    Written with softplus so that nothing overflows: log h = -softplus(log(K P_n) - log P).
    """
    b, k = scores.shape[0], scores.shape[1] - 1
    log_p = scores / temperature - log_z
    log_noise = math.log(k / num_data)
    positive = F.softplus(log_noise - log_p[:, 0]).sum()
    negative = F.softplus(log_p[:, 1:] - log_noise).sum()
    return (positive + negative) / b


@register_loss("crd", "relation")
class ContrastiveRepresentationDistillation(KnowledgeLoss):
    """L_CRD = NCE(student anchor, teacher memory) + NCE(teacher anchor, student memory).

    Tian et al., Sec. 3.2-3.4 and the authors' code (crd/): both embeddings go through a linear
    head to ``feat_dim`` and are L2-normalised; the critic is exp(g_T(t)' g_S(s) / tau) / Z with
    tau = 0.07 and Z = N * mean(exp(score / tau)) fixed on the first batch; K = 16384 negatives
    per sample drawn uniformly from the other training samples; after each training forward the
    banks move to normalise(m * old + (1 - m) * new) at the batch's indices, m = 0.5. Weight 0.8
    is the paper's CIFAR-100 setting (RepDistiller ``-b 0.8``).

    The heads are trained with the student (the teacher's head too: it is part of the critic).
    The banks and Z are buffers, so a checkpoint resumes exactly; nothing is updated in eval
    mode, so a validation pass cannot write another split's samples into the training memory.
    """

    default_weight: ClassVar[float] = 0.8

    def __init__(
        self,
        ctx: LossContext,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        memory_dtype: str = "float16",
        shared_negatives: bool = True,
    ) -> None:
        super().__init__(ctx)
        n = ctx.num_train_samples
        if n < 2:
            raise UserError(f"crd needs at least 2 training samples to draw negatives from, got {n}")
        if num_negatives < 1:
            raise UserError(f"crd: num_negatives must be at least 1, got {num_negatives}")
        if memory_dtype not in _DTYPES:
            raise UserError(f"crd: memory_dtype must be one of {', '.join(_DTYPES)}, got {memory_dtype!r}")
        self.num_data = n
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.shared_negatives = shared_negatives
        # None: the global RNG of the memory's device, so the trainer's seeding fixes the draws
        self.generator: torch.Generator | None = None
        self.embed_student = ProjectionHead(ctx.student.embedding_dim, feat_dim)
        self.embed_teacher = ProjectionHead(ctx.teacher.embedding_dim, feat_dim)
        dtype = _DTYPES[memory_dtype]
        bound = 1.0 / math.sqrt(feat_dim / 3)  # the authors' initialisation: uniform in +-bound
        self.register_buffer("memory_student", (torch.rand(n, feat_dim) * 2 - 1).mul_(bound).to(dtype))
        self.register_buffer("memory_teacher", (torch.rand(n, feat_dim) * 2 - 1).mul_(bound).to(dtype))
        # log Z for [student-anchor scores, teacher-anchor scores]; NaN until the first batch
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self._log_z_known = False  # saves a device sync per step once Z is set (or loaded)

    @property
    def memory_bytes_per_sample(self) -> int:
        """Bytes the two banks hold per training sample."""
        return 2 * self.feat_dim * self.memory_student.element_size()

    def draw_negatives(self, index: Tensor) -> Tensor:
        """K indices per sample, uniform over the training set without the sample's own index.

        Shared mode: one (K,) draw for the batch from the indices not in the batch. Per-sample
        mode: a (b, K) draw, row r from every index but index[r]. Draws are with replacement,
        as in the authors' sampler; the shift trick maps a draw from a smaller range onto the
        allowed indices exactly uniformly.
        """
        device = self.memory_student.device
        index = index.to(device)
        k = self.num_negatives
        if self.shared_negatives:
            excluded = torch.unique(index)  # sorted
            allowed = self.num_data - excluded.numel()
            if allowed < 1:
                raise UserError("crd: the batch holds every training sample, so no negative is left")
            draw = torch.randint(0, allowed, (k,), device=device, generator=self.generator)
            # the j-th excluded index (sorted) has excluded[j] - j allowed indices below it
            below = excluded - torch.arange(excluded.numel(), device=device)
            return draw + torch.searchsorted(below, draw, right=True)
        draw = torch.randint(0, self.num_data - 1, (index.shape[0], k), device=device, generator=self.generator)
        return draw + (draw >= index[:, None]).long()

    def _scores(self, anchor: Tensor, memory: Tensor, index: Tensor, negatives: Tensor) -> Tensor:
        """(b, 1 + K) dot products of each anchor with its positive and negative memory rows."""
        positive = (memory[index].float() * anchor).sum(dim=1, keepdim=True)
        if negatives.dim() == 1:
            negative = anchor @ memory[negatives].float().t()
        else:
            rows = memory[negatives].float()  # (b, K, D)
            negative = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
        return torch.cat([positive, negative], dim=1)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        index = batch.index.to(self.memory_student.device).long()
        negatives = self.draw_negatives(index)
        with full_precision(student.embedding.device):
            v_s = self.embed_student(student.embedding.float())
            v_t = self.embed_teacher(teacher.embedding.detach().float())
            scores_s = self._scores(v_s, self.memory_teacher, index, negatives)
            scores_t = self._scores(v_t, self.memory_student, index, negatives)
            if not self._log_z_known:
                if torch.isnan(self.log_z).any():
                    self._estimate_log_z(scores_s, scores_t)
                self._log_z_known = True
            loss = nce_loss(scores_s, self.log_z[0], self.num_data, self.temperature) + nce_loss(
                scores_t, self.log_z[1], self.num_data, self.temperature
            )
        if self.training:
            self._update_memory(index, v_s, v_t)
        return loss

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._log_z_known = False  # a loaded Z may be NaN (saved before the first batch)

    @torch.no_grad()
    def _estimate_log_z(self, scores_s: Tensor, scores_t: Tensor) -> None:
        """Z = N * mean(exp(score / tau)) over the first batch's positives and negatives."""
        for i, scores in enumerate((scores_s, scores_t)):
            logits = scores.detach() / self.temperature
            self.log_z[i] = torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel()) + math.log(self.num_data)

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        m = self.momentum
        for memory, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            mixed = memory[index].float() * m + v.detach().float() * (1 - m)
            memory.index_copy_(0, index, F.normalize(mixed, p=2, dim=1).to(memory.dtype))
