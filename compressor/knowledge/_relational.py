"""Shared pieces of the relation losses: full-precision regions and batch geometry.

Relation losses compare b x b (or b x b x b) structures built from sums over thousands of
products; under AMP those sums would run in half precision and overflow or lose the small
differences the losses are about, so every relation loss computes inside ``full_precision``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

EPS = 1e-12


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Turn autocast off for ``device`` (a no-op when it is not on)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def flat32(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D) in float32."""
    return x.reshape(x.shape[0], -1).float()


def pairwise_distances(e: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``e`` (b, D) -> (b, b), zero diagonal.

    Computed from the Gram matrix of the batch-centred rows (distances do not change under a
    shift, and centring keeps the cancellation in |a|^2 + |b|^2 - 2ab small), so memory is
    O(b^2) instead of the O(b^2 D) of explicit differences. The clamp keeps sqrt's gradient
    finite at coincident points, where it is then zero.
    """
    e = e - e.mean(0, keepdim=True)
    gram = e @ e.t()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(EPS)
    off_diagonal = 1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype)
    return d2.sqrt() * off_diagonal


def triplet_cosines(e: Tensor) -> Tensor:
    """cos of the angle at vertex j between e_i - e_j and e_k - e_j, as a (j, i, k) tensor.

    <e_i - e_j, e_k - e_j> = G_ik - G_ji - G_jk + G_jj from the Gram matrix G of the centred
    rows: O(b^3) memory instead of the O(b^2 D) of normalised difference vectors. Degenerate
    triples (i == j, k == j, or coincident points) get 0, as normalising a zero vector gives.
    """
    e = e - e.mean(0, keepdim=True)
    gram = e @ e.t()
    sq = gram.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * gram  # d2[j, i] = |e_i - e_j|^2
    inner = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + sq[:, None, None]
    scale = sq.max().clamp_min(EPS)
    # pairs closer than the float32 rounding noise of the Gram expansion count as coincident
    valid_pair = d2 > 1e-6 * scale
    valid_pair.fill_diagonal_(False)
    valid = valid_pair[:, :, None] & valid_pair[:, None, :]
    norms = d2.clamp_min(EPS).sqrt()
    denom = torch.where(valid, norms[:, :, None] * norms[:, None, :], torch.ones_like(inner))
    cos = torch.where(valid, inner / denom, torch.zeros_like(inner))
    return cos.clamp(-1.0, 1.0)
