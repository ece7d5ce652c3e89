"""The contract of a knowledge loss, and the registry that names them.

A knowledge loss compares what a student and a teacher computed for one batch (logits, stage
features, pooled embedding; see :class:`compressor.features.ModelOutputs`) and returns a scalar.
It learns its own parts where the method has them (a FitNet regressor, CRD's heads and memory):
those are sub-modules of the loss, trained with the student, never part of the deployable.
Shapes come from the feature taps' layouts, so any teacher/student pair can be combined.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch.nn as nn
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps, ModelOutputs, TapLayout

KINDS = ("response", "feature", "relation", "self")


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to size itself: both layouts and the training-set facts."""

    student: TapLayout
    teacher: TapLayout
    num_classes: int
    num_train_samples: int


class KnowledgeLoss(nn.Module):
    """Subclass, set ``name``/``kind``, take ``(ctx, **hyperparameters)``, implement forward."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    needs_models: ClassVar[bool] = False  # True: the scheme calls bind_models() (e.g. BSS attacks)
    # weight of this term in `--method a+b` when none is given: the paper's (or RepDistiller's) setting
    default_weight: ClassVar[float] = 1.0
    # where the reference runs this term differently next to another knowledge term (KD: 1, not 0.9),
    # its weight there; None: default_weight either way (see compressor.knowledge.spec)
    combined_weight: ClassVar[float | None] = None
    # where the reference's run of this term ALONE sets the cross-entropy weight (KD row: 0.1), that
    # weight; None: cross-entropy at 1
    ce_weight_alone: ClassVar[float | None] = None
    # > 0: a two-stage method (FSP; RepDistiller's AB, FT): the term acts only in an initialisation
    # phase of this many epochs (RepDistiller's --init_epochs, 30) before ordinary training, and not
    # after it. An instance may change it (``init_epochs`` option); 0 makes it an ordinary term.
    init_epochs: int = 0
    # what the init phase trains besides the loss's own parts: the student too (FSP, AB) or not (FT)
    init_trains_student: ClassVar[bool] = True

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        self.ctx = ctx

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        raise NotImplementedError

    def bind_models(self, student: FeatureTaps, teacher: FeatureTaps) -> None:
        """Give a loss that must run the models itself (BSS) access to them."""

    def set_train_labels(self, labels: Tensor) -> None:
        """Receive the training split's labels (int64, by sample index) before training starts.

        The trainer hands them over (:meth:`compressor.schemes.base.Scheme.bind_train_labels`);
        losses that sample by class (CRD's negatives) keep what they need, the rest ignore it.
        """

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the scheme before each epoch (``epoch`` counts from 0, of ``num_epochs``).

        Losses whose paper schedules a weight over training (DKD's warm-up, BSS's decaying
        ratios) override it; the rest ignore it, so a scheme calls it on every loss alike.
        """


_LOSSES: dict[str, type[KnowledgeLoss]] = {}


def register_loss(name: str, kind: str) -> Callable[[type[KnowledgeLoss]], type[KnowledgeLoss]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def decorator(cls: type[KnowledgeLoss]) -> type[KnowledgeLoss]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        cls.name, cls.kind = name, kind
        _LOSSES[name] = cls
        return cls

    return decorator


def loss_class(name: str) -> type[KnowledgeLoss]:
    _ensure_loaded()
    if name not in _LOSSES:
        close = difflib.get_close_matches(name, list(_LOSSES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown distillation method {name!r}{hint}; known: {', '.join(list_losses())}")
    return _LOSSES[name]


def build_loss(name: str, ctx: LossContext, **hparams: Any) -> KnowledgeLoss:
    return loss_class(name)(ctx, **hparams)


def list_losses(kind: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(n for n, c in _LOSSES.items() if kind is None or c.kind == kind)


def _ensure_loaded() -> None:
    import compressor.knowledge  # noqa: F401  (importing the package registers every loss)
