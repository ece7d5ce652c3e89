"""FitNets hint learning (Romero et al., ICLR 2015), in RepDistiller's single-stage form."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs, TapShape
from compressor.knowledge._stages import depth_index, pool_to
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss


class HintRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` (models/util.py): conv from the guided (student) map to the
    hint's (teacher's) channels and grid, then BatchNorm and (by default) ReLU.

    The conv depends on the grids, as in ``ConvReg``:

    * student grid twice the teacher's: 3x3 conv, stride 2, padding 1;
    * student grid half the teacher's: 4x4 transposed conv, stride 2, padding 1;
    * otherwise, student grid at least the teacher's: an unpadded conv of kernel
      ``(1 + H_s - H_t, 1 + W_s - W_t)``, i.e. 1x1 when the grids are equal;
    * any other smaller student grid (``ConvReg`` raises there): a 1x1 conv at the student's
      grid and the hint adaptive-average-pooled down to it, so any pair of models still works.

    The convs keep ``ConvReg``'s bias. ``ConvReg``'s ReLU is always on (``use_relu=True`` as
    RepDistiller builds it); Romero et al. Sec. 2.2 match the regressor's non-linearity to the
    hint's, which :class:`FitNetLoss` offers with ``relu=None``.
    """

    def __init__(self, guided: TapShape, hint: TapShape) -> None:
        super().__init__()
        s_h, s_w, t_h, t_w = guided.height, guided.width, hint.height, hint.width
        c_in, c_out = guided.channels, hint.channels
        self.pool_hint = False
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv: nn.Module = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(c_in, c_out, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.conv = nn.Conv2d(c_in, c_out, kernel_size=1)
            self.pool_hint = True
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, hint: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
        y = self.bn(self.conv(x))
        if relu:
            y = F.relu(y)
        if self.pool_hint or y.shape[-2:] != hint.shape[-2:]:
            size = (min(y.shape[-2], hint.shape[-2]), min(y.shape[-1], hint.shape[-1]))
            return pool_to(y, size), pool_to(hint, size)
        return y, hint


@register_loss("fitnet", "feature")
class FitNetLoss(KnowledgeLoss):
    """Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, Eq. 3.

    ``L_HT = || u_h(x) - r(v_g(x)) ||^2`` with ``u_h`` the teacher's hint layer, ``v_g`` the
    student's guided layer and ``r`` a learned conv regressor (a sub-module of this loss). As in
    RepDistiller, the hint is trained jointly with CE (no separate stage), the squared error is
    averaged (``nn.MSELoss``), the weight is 100 (``--distill hint -a 0 -b 100``), ``r`` is
    ``ConvReg`` (:class:`HintRegressor`) and ``hint_layer = 2`` indexes RepDistiller's feature
    list, where 0 is the stem and k >= 1 the k-th stage. The teacher's hint is the teacher
    stage at the same relative depth (:func:`depth_index`; same index when stage counts agree;
    stem with stem). ``relu=True`` (``ConvReg``'s default) ends the regressor in a ReLU;
    ``relu=None`` decides it from the first teacher hint seen (non-negative -> ReLU, the
    paper's rule) and remembers it in the state dict.
    """

    default_weight = 100.0

    def __init__(self, ctx: LossContext, hint_layer: int = 2, relu: bool | None = True) -> None:
        super().__init__(ctx)
        s_taps, t_taps = ctx.student, ctx.teacher
        n_s, n_t = len(s_taps.stages), len(t_taps.stages)
        if hint_layer == 0:
            if s_taps.stem is None or t_taps.stem is None:
                raise UserError(f"fitnet: hint_layer=0 means the stem, but a model here has no stem tap; use 1..{n_s}")
            guided, hint = s_taps.stem, t_taps.stem
            self.s_index = self.t_index = -1
        elif 1 <= hint_layer <= n_s:
            self.s_index = hint_layer - 1
            self.t_index = depth_index(self.s_index, n_s, n_t)
            guided, hint = s_taps.stages[self.s_index], t_taps.stages[self.t_index]
        else:
            raise UserError(f"fitnet: hint_layer={hint_layer} is out of range; use 1..{n_s} (a stage) or 0 (the stem)")
        self.hint_layer = hint_layer
        self.regressor = HintRegressor(guided, hint)
        # -1: decide from the first hint seen; 0: no ReLU; 1: ReLU
        self.register_buffer("relu_mode", torch.tensor(-1 if relu is None else int(relu), dtype=torch.int8))
        self._relu: bool | None = relu  # host-side copy of relu_mode, so forward never syncs a device

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        mode = int(self.relu_mode)
        self._relu = None if mode < 0 else bool(mode)

    def _pick(self, out: ModelOutputs, index: int) -> Tensor:
        if index < 0:
            if out.stem is None:
                raise RuntimeError("fitnet: the stem tap produced no output")
            return out.stem
        return out.features[index]

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        hint = self._pick(teacher, self.t_index).detach()
        if self._relu is None:
            self._relu = bool((hint >= 0).all())
            self.relu_mode.fill_(int(self._relu))
        pred, target = self.regressor(self._pick(student, self.s_index), hint, relu=self._relu)
        return F.mse_loss(pred.float(), target.float())
