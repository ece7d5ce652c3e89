"""The attention-weighted ensemble of an online cohort (attention-cohort paper, Sec. 3.2-3.3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.schemes.aggregators.base import Aggregate, Aggregator, register_aggregator
from compressor.schemes.peers import CohortInfo, GroupOutputs

EPSILON = 1e-7  # Eq. 10's small constant against division by zero


def attention_features(logits: Tensor, labels: Tensor, eps: float = EPSILON) -> tuple[Tensor, Tensor, Tensor]:
    """F1, F2, F3 of Eqs. 8-10 from stacked logits ``P`` (N, peers, C) and labels (N,).

    * ``F1 = GMP(P . G)``: the max over classes of the logits masked by the one-hot label ``G``:
      the peer's ground-truth logit when positive, else 0 (the zeros of the other classes win);
    * ``z = P - max(P . G) = P - F1`` (per peer), so ``-z`` > 0 where a class scores below the
      ground truth;
    * ``F2 = GAP(ReLU(-z))``: the mean margin by which the ground truth beats the classes;
    * ``F3 = GAP(ReLU(-z) / (-z + eps))``: the fraction of classes scored below the ground truth.

    Each is (N, peers).
    """
    one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)[:, None, :]
    f1 = (logits * one_hot).amax(dim=-1)
    neg_z = f1[..., None] - logits
    relu = F.relu(neg_z)
    f2 = relu.mean(dim=-1)
    f3 = (relu / (neg_z + eps)).mean(dim=-1)
    return f1, f2, f3


@register_aggregator("attention")
class AttentionEnsemble(Aggregator):
    """Weights from an attention module over the peers' logits and the labels; a weighted mean.

    ``w = sigmoid(MLP(F1) + MLP(F2) + MLP(F3))`` with one shared one-hidden-layer MLP (as CBAM's
    channel attention, Eq. 7, whose input here is each descriptor over the N peers);
    ``E = sum_i w_i P_i / sum_i w_i`` (Eq. 2, on logits); the loss (Eq. 3) is
    ``CE(G, E) + sum_i [CE(G, P_i) + lambda tau^2 KL(softmax(E/tau) || softmax(P_i/tau))]``, with
    tau = 3, lambda = 1, N = 3 (Sec. 4.1); the peers' CE terms are added by the scheme.

    The ensemble needs the labels, so it exists only during training (Sec. 5.1); the deployable is
    one peer. The paper does not say where the gradient stops; as in the KD it builds on (and in
    ONE, the ensembling method it compares with), ``E`` is a detached target in the KD term, and is
    trained (with the attention MLP and, through it, the peers) by its own ``CE(G, E)``. The MLP's
    hidden width is not given in the paper: it is ``N`` by default (``hidden``).
    """

    needs_labels = True
    default_temperature = 3.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0,
                 hidden: int | None = None) -> None:
        super().__init__(info, temperature, kd_weight)
        n = info.num_peers
        hidden = n if hidden is None else int(hidden)
        self.mlp = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def weights(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(N, peers) attention weights in (0, 1) from stacked logits (N, peers, C)."""
        f1, f2, f3 = attention_features(logits.float(), labels)
        return torch.sigmoid(self.mlp(f1) + self.mlp(f2) + self.mlp(f3))

    def combine(self, logits: Tensor, weights: Tensor) -> Tensor:
        """Eq. 2: the weighted mean of the peers' logits."""
        w = weights.to(logits.dtype)[:, :, None]
        return (w * logits).sum(dim=1) / w.sum(dim=1)

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        stacked = out.stacked_logits()
        e = self.combine(stacked, self.weights(stacked, y))
        kd = self.distill([p.logits for p in out.peers], e)
        return Aggregate(e, {"ensemble_ce": F.cross_entropy(e, y), "kd": self.kd_weight * kd})

    def ensemble(self, out: GroupOutputs) -> Tensor:
        raise RuntimeError("the attention ensemble needs the labels: it exists only during training")
