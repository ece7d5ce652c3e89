"""Peer collaborative learning, PCL (Wu & Gong, AAAI 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.schemes.aggregators.base import Aggregate, Aggregator, RampUp, register_aggregator
from compressor.schemes.peers import CohortInfo, GroupOutputs, PeerGroup

PCL_RAMPUP = 80 / 300  # sigmoid ramp-up over 80 of 300 epochs, as in ONE, whose setting PCL follows
PCL_EMA_DECAY = 0.999  # the temporal-mean decay of Mean Teacher, which PCL's peer mean teacher is


def kl_to_probabilities(student_logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """KL(target || softmax(z / T)) for a target given as probabilities; batch mean, target detached."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, target.detach().float(), reduction="batchmean")


@register_aggregator("pcl")
class PeerCollaborativeLearning(Aggregator):
    """Peer ensemble teacher over the peers' features + temporal-mean peer teachers.

    Wu & Gong, Sec. 3: a multi-branch network whose branches ("peers") share the low layers;

    * peer ensemble teacher: the peers' pooled features, concatenated, through an extra
      classifier: ``z_e = FC([f_1; ...; f_m])``, trained by ``CE(z_e, y)`` (which also reaches the
      peers' features) and distilled into every peer, ``L_pe = T^2 sum_i KL(p_e || p_i)``;
    * peer mean teacher: a temporal mean (EMA) of the whole multi-branch network; peer ``i``
      mimics the average prediction of the OTHER peers' mean teachers,
      ``L_pm = T^2 sum_i KL(1/(m-1) sum_{l != i} p'_l || p_i)``;
    * ``L = sum_i CE(z_i, y) + CE(z_e, y) + w(e) (L_pe + L_pm)``, T = 3, ``w(e)`` the sigmoid
      ramp-up, EMA decay 0.999 with Mean Teacher's warm-up ``min(1 - 1/(step + 1), 0.999)``.

    Both teachers are targets only: ``p_e`` is detached in ``L_pe``, the mean teachers never get
    gradients (they move only by the EMA, in :meth:`after_step`, parameters and BN statistics).
    The mean teachers are deployable candidates too ("mean0" ...), chosen on validation like the
    peers. Left out: the paper's different random augmentation per peer input (the data source
    augments each batch once). ModReduce applies PCL to separate students: the EMA then copies
    each student, and the ensemble classifier reads their embeddings, as in the branched case.
    """

    multi_branch = True
    default_temperature = 3.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0,
                 rampup: float = PCL_RAMPUP, ema_decay: float = PCL_EMA_DECAY) -> None:
        super().__init__(info, temperature, kd_weight)
        if not 0 <= ema_decay < 1:
            raise ValueError(f"pcl: ema_decay must be in [0, 1), got {ema_decay}")
        self.classifier = nn.Linear(sum(info.embedding_dims), info.num_classes)
        self.rampup = RampUp(rampup)
        self.ema_decay = float(ema_decay)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.mean_group: PeerGroup | None = None

    def bind(self, group: PeerGroup) -> None:
        self.__dict__["_live"] = group  # a reference, not a second registration of its weights
        mean = group.clone()
        mean.requires_grad_(False)
        self.mean_group = mean.eval()

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        self.rampup.set_epoch(epoch, num_epochs)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.mean_group] if self.mean_group is not None else []

    def ensemble(self, out: GroupOutputs) -> Tensor:
        return self.classifier(torch.cat([p.embedding for p in out.peers], dim=1))

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        if self.mean_group is None:
            raise RuntimeError("pcl: bind(group) was not called")
        z_e = self.ensemble(out)
        logits = [p.logits for p in out.peers]
        t = self.temperature
        pe = self.distill(logits, z_e)
        with torch.no_grad():
            mean_out = self.mean_group(out.x)
            mean_probs = [torch.softmax(p.logits.float() / t, dim=1) for p in mean_out.peers]
        pm = logits[0].new_zeros((), dtype=torch.float32)
        for i, z in enumerate(logits):
            others = torch.stack([q for l, q in enumerate(mean_probs) if l != i]).mean(dim=0)
            pm = pm + kl_to_probabilities(z, others, t)
        w = self.kd_weight * self.rampup.weight
        return Aggregate(z_e, {
            "ensemble_ce": F.cross_entropy(z_e, y),
            "peer_ensemble": w * pe,
            "peer_mean": w * (t * t) * pm,
        })

    @torch.no_grad()
    def after_step(self) -> None:
        live: PeerGroup = self.__dict__["_live"]
        mean = self.mean_group
        # Mean Teacher's warm-up, kept on the device (no host sync per step)
        step = self.ema_steps.to(torch.float32)
        weight = (1.0 / (step + 1.0)).clamp(min=1.0 - self.ema_decay)  # = 1 - decay
        for p_mean, p in zip(mean.parameters(), live.parameters()):
            p_mean.lerp_(p.detach().to(p_mean.dtype), weight.to(p_mean.dtype))
        for b_mean, b in zip(mean.buffers(), live.buffers()):
            if b_mean.is_floating_point():
                b_mean.lerp_(b.to(b_mean.dtype), weight.to(b_mean.dtype))
            else:
                b_mean.copy_(b)
        self.ema_steps += 1

    def candidates(self) -> dict[str, nn.Module]:
        if self.mean_group is None:
            return {}
        return {f"mean{i}": self.mean_group.peer(i) for i in range(len(self.mean_group))}

    def export_candidate(self, name: str) -> nn.Module:
        if self.mean_group is None or not name.startswith("mean"):
            raise KeyError(name)
        return self.mean_group.export(int(name[4:]))
