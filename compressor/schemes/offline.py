"""Offline distillation: a frozen teacher, one student, CE plus weighted knowledge losses.

    L = w_ce * CE(y, s) + sum_k w_k * L_k(student outputs, teacher outputs)

(the CRD/RepDistiller benchmark's objective, gamma * CE + alpha * KD + beta * other). The teacher
runs in eval mode under ``torch.no_grad``: no graph, no gradient, never updated. (Not
``inference_mode``: its tensors could not be saved for the backward of the student's losses,
which need them, without a copy.)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import FeatureTaps
from compressor.knowledge import LossContext, build_loss
from compressor.schemes.base import Scheme
from compressor.schemes.registry import SchemeRequest, register_scheme


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode, no gradients, so no optimiser and no DDP hook ever touches it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def knowledge_losses(
    terms: Sequence[tuple[str, float]],
    student_taps: FeatureTaps,
    teacher_taps: FeatureTaps,
    *,
    num_classes: int,
    num_train: int,
    loss_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> nn.ModuleDict:
    """One loss module per method term, sized from this student/teacher pair's tap layouts.

    Schemes with several teachers (DGKD) call it once per teacher: each gets its own learnable
    parts (a FitNet regressor fits one teacher's channels, CRD keeps one memory per teacher).
    """
    ctx = LossContext(
        student=student_taps.layout(), teacher=teacher_taps.layout(),
        num_classes=num_classes, num_train_samples=num_train,
    )
    options = loss_options or {}
    losses = nn.ModuleDict({name: build_loss(name, ctx, **options.get(name, {})) for name, _ in terms})
    for loss in losses.values():
        if loss.needs_models:
            loss.bind_models(student_taps, teacher_taps)
    return losses


class Offline(Scheme):
    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        terms: Sequence[tuple[str, float]],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        num_train: int,
        ce_weight: float = 1.0,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = student
        self.ce_weight = float(ce_weight)
        self.teacher_taps = FeatureTaps(teacher, input_shape)
        self.student_taps = FeatureTaps(student, input_shape)
        self.losses = knowledge_losses(
            terms, self.student_taps, self.teacher_taps, num_classes=num_classes, num_train=num_train,
            loss_options=loss_options,
        )
        self.weights = {name: float(w) for name, w in terms}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher_taps(batch.x)
        student_out = self.student_taps(batch.x)
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(student_out.logits, batch.y)
        for name, loss in self.losses.items():
            terms[name] = self.weights[name] * loss(student_out, teacher_out, batch)
        return terms

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def deployable(self) -> nn.Module:
        return self.student


def loss_options_of(request: SchemeRequest) -> dict[str, dict[str, Any]]:
    """Per-term hyper-parameters; SemCKD's batch-similarity size follows the stage's batch size."""
    options = {name: dict(hp) for name, hp in (request.options.get("loss_options") or {}).items()}
    if request.options.get("batch_size"):
        options.setdefault("semckd", {}).setdefault("batch_size", int(request.options["batch_size"]))
    return options


def build_offline(request: SchemeRequest, student: nn.Module | None = None) -> Offline:
    """The offline scheme of a request; ``student`` overrides building it from the zoo (chains)."""
    from compressor.errors import UserError
    from compressor.knowledge.spec import parse_method_spec
    from compressor.models import create

    if request.teacher is None:
        raise UserError("offline distillation needs a teacher (--teacher T.pt)")
    spec = parse_method_spec(request.method or "hinton")
    if student is None:
        student = create(request.student_arch, num_classes=request.num_classes, in_chans=request.input_shape[0])
    return Offline(
        request.teacher, student, spec.terms, input_shape=request.input_shape, num_classes=request.num_classes,
        num_train=request.num_train, ce_weight=spec.ce_weight, loss_options=loss_options_of(request),
    )


register_scheme("offline")(build_offline)
