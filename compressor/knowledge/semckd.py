"""Cross-layer knowledge distillation with semantic calibration, SemCKD (Chen et al., AAAI 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs
from compressor.knowledge._stages import full_precision, pool_to, smaller_size
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


class _SimilarityEmbed(nn.Module):
    """Row of a sample-similarity matrix -> L2-normalised query/key vector (Linear-ReLU-Linear)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, 2 * dim_out), nn.ReLU(), nn.Linear(2 * dim_out, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class _Projection(nn.Module):
    """Student map -> a teacher map's channels: 1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv.

    The bottleneck is twice the teacher's channel count and the ReLUs work in place, as in the
    official code (``Proj``).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = 2 * c_out
        self.net = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def sample_similarity(feature: Tensor) -> Tensor:
    """Psi(F) Psi(F)^T: the (N, N) inner products of the flattened per-sample maps."""
    with full_precision(feature):
        flat = feature.float().flatten(1)
        return flat @ flat.t()


@register_loss("semckd", "feature")
class SemCKDLoss(KnowledgeLoss):
    """Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021, Eqs. 3-6.

    Every student stage ``s_l`` is associated softly with ALL teacher stages ``t_k``:

    * query/key: the rows of each stage's (N, N) sample-similarity matrix pass through a
      per-stage MLP (query for student stages, key for teacher stages) into L2-normalised vectors
      of size ``batch_size // factor``; ``alpha_{l,k} = softmax_k(q_l . k_k)`` per sample (Eq. 4);
    * per pair (l, k), a projection (1x1-3x3-1x1 convs with BN/ReLU) maps the student map to the
      teacher map's channels; the larger of the two grids is adaptive-average-pooled to the
      smaller one (Eq. 5);
    * ``L = sum_{l,k} alpha_{l,k} * MSE(proj_{l,k}(s_l), t_k)`` with the MSE averaged over
      (C, H, W) per sample, then averaged over samples and student stages (Eq. 6).

    Stage matching is therefore learned, not fixed: any stage counts, channels and grids work.
    ``beta = 400`` is the weight of ModReduce's setup (and SemCKD's CIFAR runs), next to CE and
    Hinton KD. The stem and pooled embedding are not used (the official code takes
    ``feat[1:-1]``). All parts (query/key MLPs, projections) are sub-modules of this loss.

    The query/key MLPs read similarity rows, whose length is the batch size, so that size is
    fixed at construction (``batch_size``, 64 as in the paper's CIFAR runs). A smaller batch
    (the last one of an epoch) is zero-padded to it; a larger batch is a user error. Under DDP
    it is the per-process batch.
    """

    default_weight = 400.0

    def __init__(self, ctx: LossContext, batch_size: int = 64, factor: int = 4) -> None:
        super().__init__(ctx)
        if batch_size < factor or factor < 1:
            raise UserError(f"semckd: batch_size={batch_size} must be at least factor={factor} (>= 1)")
        self.batch_size = int(batch_size)
        s_stages, t_stages = ctx.student.stages, ctx.teacher.stages
        dim = self.batch_size // factor
        self.queries = nn.ModuleList(_SimilarityEmbed(self.batch_size, dim) for _ in s_stages)
        self.keys = nn.ModuleList(_SimilarityEmbed(self.batch_size, dim) for _ in t_stages)
        self.projections = nn.ModuleList(
            nn.ModuleList(_Projection(s.channels, t.channels) for t in t_stages) for s in s_stages
        )

    def _embed(self, mlps: nn.ModuleList, maps: list[Tensor]) -> Tensor:
        """(N, stages, dim) query or key vectors from each stage's similarity matrix."""
        n = maps[0].shape[0]
        if n > self.batch_size:
            raise UserError(
                f"semckd: a batch of {n} exceeds its batch_size={self.batch_size}; set semckd's batch_size to the"
                " training batch size"
            )
        vectors = []
        for mlp, m in zip(mlps, maps):
            sim = sample_similarity(m)
            if n < self.batch_size:
                sim = F.pad(sim, (0, self.batch_size - n))
            vectors.append(mlp(sim))
        return torch.stack(vectors, dim=1)

    def attention(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """alpha of Eq. 4: (N, student stages, teacher stages), rows sum to one.

        Computed in float32 even under autocast: similarity entries easily exceed half range.
        """
        with full_precision(student[0]):
            query = self._embed(self.queries, student)
            key = self._embed(self.keys, [t.detach() for t in teacher])
            return torch.softmax(query @ key.transpose(1, 2), dim=-1)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        s_maps, t_maps = student.features, [t.detach() for t in teacher.features]
        alpha = self.attention(s_maps, t_maps)
        rows = []
        for l, s in enumerate(s_maps):
            row = []
            for k, t in enumerate(t_maps):
                grid = smaller_size(tuple(s.shape[-2:]), tuple(t.shape[-2:]))
                pred = self.projections[l][k](pool_to(s, grid)).float()
                row.append((pred - pool_to(t, grid).float()).pow(2).flatten(1).mean(dim=1))
            rows.append(torch.stack(row, dim=1))
        per_pair = torch.stack(rows, dim=1)  # (N, student stages, teacher stages)
        return (alpha * per_pair).sum() / (per_pair.shape[0] * len(s_maps))
