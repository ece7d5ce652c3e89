"""Batched augmentation for in-memory sources: one gather per batch, on the tensors' device.

Zero-pad by ``pad`` pixels, take a random ``H x W`` window (offsets uniform in ``[0, 2*pad]``),
and optionally mirror it left-right with probability 1/2. With ``pad=4`` and flipping this is the
standard CIFAR recipe (He et al. 2016, "Deep Residual Learning", Sec. 4.2); with ``pad=1`` and no
flip it is the +-1 pixel shift we use for 8x8 digits (a mirrored digit is another glyph).

Random parameters are drawn up front for a whole epoch on the CPU from a seeded generator
(:func:`draw_params`) and applied per batch (:func:`crop_flip`); no per-image Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlip:
    """Augmentation recipe of an in-memory source."""

    pad: int
    flip: bool

    def draw_params(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 3) int64: row offset, column offset, flip flag for n samples."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        if self.flip:
            flips = torch.randint(0, 2, (n, 1), generator=gen)
        else:
            flips = torch.zeros(n, 1, dtype=torch.int64)
        return torch.cat([offsets, flips], dim=1)


def crop_flip(images: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Apply per-image (row offset, col offset, flip) to ``images`` (N, C, H, W), any dtype.

    Output pixel (i, j) of image n is padded pixel (dy_n + i, dx_n + j'), where j' = W-1-j if the
    image is flipped, else j: crop and mirror in one advanced-indexing gather.
    """
    n, c, h, w = images.shape
    if n == 0:
        return images
    params = params.to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    cols = torch.arange(w, device=images.device)
    cols = torch.where(params[:, 2:3].bool(), cols.flip(0), cols)  # (N, W)
    rows = params[:, 0:1] + torch.arange(h, device=images.device)  # (N, H)
    cols = params[:, 1:2] + cols
    batch_idx = torch.arange(n, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
