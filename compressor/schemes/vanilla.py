"""Vanilla training: one model, cross-entropy on the labels. Teachers and baseline students."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.schemes.base import Scheme
from compressor.schemes.registry import REFUSED, SchemeOptions, SchemeRequest, register_scheme


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


@dataclass
class VanillaOptions(SchemeOptions):
    """No options, and no teacher: the labels alone."""

    teacher = REFUSED


@register_scheme("vanilla", options=VanillaOptions)
def build_vanilla(request: SchemeRequest) -> Vanilla:
    """A model trained on its labels alone (a teacher, or the baseline a distilled student must beat)."""
    from compressor.models import create

    model = create(request.student_arch, num_classes=request.num_classes, in_chans=request.input_shape[0])
    return Vanilla(model, label_smoothing=request.label_smoothing)
