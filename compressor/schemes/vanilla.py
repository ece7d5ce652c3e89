"""Vanilla training: one model, cross-entropy on the labels. Teachers and baseline students."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.schemes.base import Scheme


class Vanilla(Scheme):
    """``{"ce": CE(model(x), y)}``; the deployable is the model itself."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.model(batch.x)
        return {"ce": F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def deployable(self) -> nn.Module:
        return self.model
