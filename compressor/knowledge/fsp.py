"""Flow of Solution Procedure (FSP) matrices (Yim, Joo, Bae & Kim, CVPR 2017)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs, TapShape
from compressor.knowledge._stages import full_precision, match_by_depth, pool_pair
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """G_ij = sum_{h,w} F1_i(h,w) F2_j(h,w) / (h*w)  (Yim et al. Eq. 1), shape (N, C1, C2).

    Maps of different grids are brought to the smaller one by adaptive average pooling first
    (RepDistiller's rule; the paper pairs maps of equal size).
    """
    with full_precision(bottom):
        bottom, top = pool_pair(bottom.float(), top.float())
        return torch.einsum("nahw,nbhw->nab", bottom, top) / (bottom.shape[-2] * bottom.shape[-1])


REPDISTILLER_INIT_EPOCHS = 30  # train_student.py --init_epochs


@register_loss("fsp", "feature")
class FSPLoss(KnowledgeLoss):
    """Yim et al., "A Gift from Knowledge Distillation", CVPR 2017, Eq. 2.

    ``L = sum_i lambda_i || G_i^T - G_i^S ||^2`` over the FSP matrices of consecutive maps in the
    chain stem -> stage 1 -> ... -> last stage (the stem only where both models have one), with
    equal ``lambda_i`` and the squared error averaged over matrix entries and samples, as in
    RepDistiller. Differences from the paper, where the models differ:

    * Stage counts: the chains are made equally long by taking, from the longer one, the
      stages at the same relative depth (:func:`match_by_depth`).
    * Channels: the paper (and RepDistiller, which raises) needs equal channel counts. Where a
      student map's channels differ from its teacher partner's, a learned 1x1 conv (no bias)
      projects it to the teacher's channels before the FSP matrix is taken; the projections
      are sub-modules of this loss. Where channels agree nothing is added.

    Procedure (the paper's two stages, as RepDistiller runs them): an init phase of
    ``init_epochs = 30`` epochs (train_student.py ``--init_epochs``) trains the student's
    feature layers (and the projections above) on this loss alone, with SGD at the run's
    learning rate, momentum and weight decay and no schedule (helper/pretrain.py ``init``);
    then ordinary training, in which FSP no longer acts: RepDistiller's main loop sets the
    FSP term to 0 (helper/loops.py), so its row ``--distill fsp -a 0 -b 50`` is CE alone and
    the ``-b 50`` multiplies nothing. The init phase sums the terms unweighted
    (``loss = sum(loss_group)``), hence weight 1. ``init_epochs=0`` makes FSP an ordinary
    term trained jointly with CE instead (not the paper's procedure; give it a weight, e.g.
    ``fsp:50``).
    """

    default_weight = 1.0  # the init phase's plain sum of the FSP terms (helper/pretrain.py)
    init_epochs = REPDISTILLER_INIT_EPOCHS

    def __init__(self, ctx: LossContext, init_epochs: int = REPDISTILLER_INIT_EPOCHS) -> None:
        super().__init__(ctx)
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise UserError(f"fsp: init_epochs must be a whole number >= 0, got {init_epochs!r}")
        self.init_epochs = init_epochs
        s_taps, t_taps = ctx.student, ctx.teacher
        self.use_stem = s_taps.stem is not None and t_taps.stem is not None
        pairs = match_by_depth(len(s_taps.stages), len(t_taps.stages))
        self.s_indices = [i for i, _ in pairs]
        self.t_indices = [j for _, j in pairs]
        s_chain = ([s_taps.stem] if self.use_stem else []) + [s_taps.stages[i] for i in self.s_indices]
        t_chain = ([t_taps.stem] if self.use_stem else []) + [t_taps.stages[j] for j in self.t_indices]
        if len(s_chain) < 2:
            raise ValueError("fsp: needs at least two maps (stem + one stage, or two stages) in each model")
        self.projections = nn.ModuleList(self._projection(s, t) for s, t in zip(s_chain, t_chain))

    @staticmethod
    def _projection(s: TapShape, t: TapShape) -> nn.Module:
        if s.channels == t.channels:
            return nn.Identity()
        return nn.Conv2d(s.channels, t.channels, kernel_size=1, bias=False)

    def _chain(self, out: ModelOutputs, indices: list[int]) -> list[Tensor]:
        maps = [out.features[i] for i in indices]
        if self.use_stem:
            if out.stem is None:
                raise RuntimeError("fsp: the stem tap produced no output")
            maps.insert(0, out.stem)
        return maps

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        s_maps = [proj(m) for proj, m in zip(self.projections, self._chain(student, self.s_indices))]
        t_maps = [m.detach() for m in self._chain(teacher, self.t_indices)]
        total = 0.0
        for k in range(len(s_maps) - 1):
            g_s = fsp_matrix(s_maps[k], s_maps[k + 1])
            g_t = fsp_matrix(t_maps[k], t_maps[k + 1])
            total = total + (g_s - g_t).pow(2).mean()
        return total
