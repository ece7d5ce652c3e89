"""Offline distillation: a frozen teacher, one student, CE plus weighted knowledge losses.

    L = w_ce * CE(y, s) + sum_k w_k * L_k(student outputs, teacher outputs)

(the CRD/RepDistiller benchmark's objective, gamma * CE + alpha * KD + beta * other). The teacher
runs in eval mode under ``torch.no_grad``: no graph, no gradient, never updated. (Not
``inference_mode``: its tensors could not be saved for the backward of the student's losses,
which need them, without a copy.)

Two-stage methods (a loss with ``init_epochs > 0``: FSP) follow RepDistiller's procedure
(train_student.py with helper/pretrain.py ``init``): first an initialisation phase in which the
student (and the loss's own parts) train on those terms alone, then ordinary training in which
they no longer act, only CE and the other terms do. The trainer runs the phases
(compressor/trainer/init_phase.py); this scheme says which terms and parameters each one trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.knowledge import LossContext, build_loss
from compressor.knowledge.spec import MethodSpec
from compressor.schemes.base import Scheme
from compressor.schemes.registry import SchemeOptions, SchemeRequest, register_scheme

DEFAULT_METHOD = "hinton"  # what a stage that names no method trains with (the offline and DGKD schemes)


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
    init_phase: bool = False,
) -> nn.ModuleDict:
    """One loss module per method term, sized from this student/teacher pair's tap layouts.

    Schemes with several teachers (DGKD) call it once per teacher: each gets its own learnable
    parts (a FitNet regressor fits one teacher's channels, CRD keeps one memory per teacher).
    ``init_phase``: the scheme runs two-stage methods' init phase; without it such a term
    (FSP) is refused, since training it jointly would not be its method.
    """
    ctx = LossContext(
        student=student_taps.layout(), teacher=teacher_taps.layout(),
        num_classes=num_classes, num_train_samples=num_train,
    )
    options = loss_options or {}
    losses = nn.ModuleDict({name: build_loss(name, ctx, **options.get(name, {})) for name, _ in terms})
    staged = [name for name, loss in losses.items() if loss.init_epochs > 0]
    if staged and not init_phase:
        raise UserError(f"{', '.join(staged)} trains in an initialisation phase before ordinary training, "
                        "which this scheme does not run: use the offline scheme")
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
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = student
        self.ce_weight = float(ce_weight)
        self.label_smoothing = float(label_smoothing)  # on the hard-label term only (the trainer's setting)
        self.teacher_taps = FeatureTaps(teacher, input_shape)
        self.student_taps = FeatureTaps(student, input_shape)
        self.losses = knowledge_losses(
            terms, self.student_taps, self.teacher_taps, num_classes=num_classes, num_train=num_train,
            loss_options=loss_options, init_phase=True,
        )
        self.weights = {name: float(w) for name, w in terms}
        self.init_terms = [name for name, loss in self.losses.items() if loss.init_epochs > 0]
        # a scheme with an init phase starts in it; the trainer moves it on (or on to "main" on resume)
        self.phase = "init" if self.init_terms else "main"

    @property
    def has_unused_parameters(self) -> bool:  # type: ignore[override]
        # two phases: the classifier idles in the init phase, the init terms' parts after it
        return bool(self.init_terms)

    def init_phase_epochs(self) -> int:
        """The longest init phase any term asks for (all init terms train together)."""
        return max((self.losses[name].init_epochs for name in self.init_terms), default=0)

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)
        self.phase = phase if self.init_terms else "main"

    def _active(self) -> list[str]:
        """The terms of the current phase: the init terms alone, or every other term."""
        if self.phase == "init":
            return list(self.init_terms)
        return [name for name in self.losses if name not in self.init_terms]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher_taps(batch.x)
        student_out = self.student_taps(batch.x)
        terms = {}
        if self.ce_weight and self.phase == "main":
            terms["ce"] = self.ce_weight * F.cross_entropy(student_out.logits, batch.y,
                                                           label_smoothing=self.label_smoothing)
        for name in self._active():
            terms[name] = self.weights[name] * self.losses[name](student_out, teacher_out, batch)
        return terms

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student and the current phase's loss parts (in the init phase the student only
        where an init term trains it: RepDistiller's FT trains its paraphraser alone)."""
        active = self._active()
        modules: list[nn.Module] = [self.losses[name] for name in active]
        if self.phase == "main" or any(self.losses[name].init_trains_student for name in active):
            modules.insert(0, self.student)
        seen: set[int] = set()
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def deployable(self) -> nn.Module:
        return self.student


@dataclass
class OfflineOptions(SchemeOptions):
    """``loss_options``: per-term hyper-parameters, e.g. ``{"hinton": {"temperature": 4}}``;
    ``prune``: the record of a teacher pruned to the budget (recipes.pruned), from whose kept weights
    the runner starts the student (it arrives as ``SchemeRequest.student_init``)."""

    takes_method = True
    default_method = DEFAULT_METHOD
    knowledge_terms = True

    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    prune: dict[str, Any] | None = None


def method_of(request: SchemeRequest) -> MethodSpec:
    """The request's method spec, or the schemes' default (:data:`DEFAULT_METHOD`)."""
    from compressor.knowledge.spec import parse_method_spec

    return parse_method_spec(request.method or DEFAULT_METHOD)


def loss_options_of(request: SchemeRequest) -> dict[str, dict[str, Any]]:
    """Per-term hyper-parameters; SemCKD's batch-similarity size follows the stage's batch size."""
    options = {name: dict(hp) for name, hp in request.options.loss_options.items()}
    if request.batch_size:
        options.setdefault("semckd", {}).setdefault("batch_size", int(request.batch_size))
    return options


@register_scheme("offline", options=OfflineOptions)
def build_offline(request: SchemeRequest, student: nn.Module | None = None) -> Offline:
    """The offline scheme of a request; ``student`` overrides building it from the zoo (chains)."""
    from compressor.models import create

    if request.teacher is None:
        raise UserError("offline distillation needs a teacher (--teacher T.pt)")
    spec = method_of(request)
    if student is None:  # a pruned teacher arrives built (recipes.pruned): its widths are not the zoo's
        student = request.student_init
    if student is None:
        student = create(request.student_arch, num_classes=request.num_classes, in_chans=request.input_shape[0])
    return Offline(
        request.teacher, student, spec.terms, input_shape=request.input_shape, num_classes=request.num_classes,
        num_train=request.num_train, ce_weight=spec.ce_weight, loss_options=loss_options_of(request),
        label_smoothing=request.label_smoothing,
    )
