"""The unit of data every loader yields and every scheme consumes."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    x: Tensor  # float images, normalised, on the training device, (N, C, H, W)
    y: Tensor  # int64 labels (N,)
    index: Tensor  # int64 position of each sample in its split (N,); CRD and OSAKD key memory on it
