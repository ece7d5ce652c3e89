"""On-the-fly native ensemble, ONE (Lan, Zhu & Gong, NeurIPS 2018)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.schemes.aggregators.base import Aggregate, Aggregator, RampUp, register_aggregator
from compressor.schemes.peers import CohortInfo, GroupOutputs

ONE_RAMPUP = 80 / 300  # the authors' code: sigmoid ramp-up over 80 of 300 epochs


@register_aggregator("one")
class NativeEnsemble(Aggregator):
    """Gated ensemble of branches over shared low layers, distilled back into every branch.

    Lan et al., Sec. 3 and the authors' code (ONE_NeurIPS2018): the gate is
    ``softmax(ReLU(BN(FC(GAP(shared)))))``, one weight per branch, read from the shared trunk's
    output; the teacher's logits are ``z_e = sum_i g_i z_i``; the loss adds
    ``CE(z_e, y) + w(e) T^2 sum_i KL(p_e || p_i)`` to the branches' own cross-entropy, T = 3,
    ``w(e)`` the sigmoid ramp-up over 80/300 of the epochs. The teacher side of the KL is
    detached (``Variable(target.data)`` in their KLLoss); the ensemble's cross-entropy trains the
    gate, the branches and the trunk.

    Peers that share no trunk (ModReduce's three students: "inputs and predictions are used to
    learn a weight for each student") get the same gate over the input's per-channel means and
    the students' (detached) logits.
    """

    multi_branch = True
    default_temperature = 3.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0,
                 rampup: float = ONE_RAMPUP) -> None:
        super().__init__(info, temperature, kd_weight)
        n = info.num_peers
        if info.shared_channels is not None:
            gate_in = info.shared_channels
        else:
            gate_in = info.input_shape[0] + n * info.num_classes
        self.gate_fc = nn.Linear(gate_in, n)
        self.gate_bn = nn.BatchNorm1d(n)
        self.rampup = RampUp(rampup)

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        self.rampup.set_epoch(epoch, num_epochs)

    def gate(self, out: GroupOutputs) -> Tensor:
        """(N, peers) weights, each row on the simplex."""
        if out.shared is not None:
            feats = out.shared.float().mean(dim=(2, 3))
        else:
            logits = [p.logits.detach().float() for p in out.peers]
            feats = torch.cat([out.x.float().mean(dim=(2, 3)), *logits], dim=1)
        return torch.softmax(F.relu(self.gate_bn(self.gate_fc(feats))), dim=1)

    def ensemble(self, out: GroupOutputs) -> Tensor:
        g = self.gate(out)
        stacked = out.stacked_logits()
        return (g.to(stacked.dtype)[:, :, None] * stacked).sum(dim=1)

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        z_e = self.ensemble(out)
        kd = self.distill([p.logits for p in out.peers], z_e)
        w = self.kd_weight * self.rampup.weight
        return Aggregate(z_e, {"ensemble_ce": F.cross_entropy(z_e, y), "kd": w * kd})
