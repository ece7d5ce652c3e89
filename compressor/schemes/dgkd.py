"""DGKD: densely guided distillation from the teacher and every assistant above (Son et al., ICCV 2021).

Son, Na, Choi & Hwang, "Densely Guided Knowledge Distillation using Multiple Teacher Assistants"
(arXiv:2009.08825). TAKD (Mirzadeh et al. 2020, arXiv:1902.03393) trains a chain T -> TA_1 -> ...
-> S where each model learns from the one above only, so an error of one assistant reaches every
model below it (the paper's "error avalanche"). DGKD keeps the chain's order but lets each model
learn from ALL the trained, larger models at once (Sec. 3.2): the student of a T -> TA_1 -> TA_2 -> S
chain learns from T, TA_1 and TA_2 together:

    L = w_ce * CE(y, s) + sum_{i in kept} sum_k w_k * L_k(student, teacher_i)

with one set of knowledge terms per teacher (the method spec; ``hinton``, the paper's KD loss,
by default), each built for that teacher's layout (a FitNet regressor per teacher, a CRD memory
per teacher). The kept terms are summed, not renormalised, as the official code does
(``loss = (1 - lambda) * L_SL + lambda * T^2 * sum(kept KD losses)``).

Stochastic DGKD (Sec. 3.3): for every mini-batch some teachers' terms are dropped at random, which
acts as a regulariser like dropout. Which ones and how many, here:

* ``drop_rate=None`` (default): exactly ONE of the n teachers is dropped per batch, chosen uniformly,
  the teacher itself included: the official code's ``--drop-num 1`` default (``train.py`` of
  github.com/wonchulSon/DGKD removes ``random.choice`` of the whole list, teacher first). With a
  single teacher nothing is dropped.
* ``drop_rate=p`` in [0, 1): ``p * n`` teachers are dropped per batch in expectation (the integer
  part always, one more with probability equal to the fractional part), chosen uniformly, so the
  fraction of dropped (batch, teacher) terms is exactly ``p`` in expectation. At least one teacher is
  always kept: the count is capped at ``n - 1``, so a rate above ``(n - 1) / n`` drops less than
  stated (and a lone teacher is never dropped: there would be nothing left to learn from).

The draws use the global torch RNG (CPU generator), which the trainer seeds per epoch and rank,
so a seed fixes the drops and a resumed run draws what the uninterrupted run drew.

Where the paper text was not available to us, the official code decided (the drop count, that the
teacher may be dropped, no renormalisation); the drop-rate form is ours, a generalisation that
reproduces the official default when ``p = 1 / n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.schemes.base import Scheme
from compressor.schemes.offline import DEFAULT_METHOD, freeze, knowledge_losses, loss_options_of, method_of
from compressor.schemes.registry import SchemeOptions, SchemeRequest, register_scheme


def check_drop_rate(drop_rate: Any) -> float | None:
    """``None`` (the official one-per-batch drop) or a float in [0, 1); anything else is a UserError."""
    if drop_rate is None:
        return None
    try:
        rate = float(drop_rate)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate < 1.0:
        raise UserError(f"DGKD drop rate must be a number in [0, 1) (got {drop_rate!r}); 0 keeps every teacher")
    return rate


def sample_dropped(num_teachers: int, drop_rate: float | None) -> list[bool]:
    """Which of ``num_teachers`` teachers sit this batch out (see the module docstring)."""
    if num_teachers <= 1:
        return [False] * num_teachers
    if drop_rate is None:
        count = 1
    else:
        expected = drop_rate * num_teachers
        count = int(math.floor(expected))
        if expected > count and torch.rand(()).item() < expected - count:
            count += 1
        count = min(count, num_teachers - 1)
    dropped = [False] * num_teachers
    for i in torch.randperm(num_teachers)[:count].tolist():
        dropped[i] = True
    return dropped


def default_teacher_names(count: int) -> list[str]:
    """``teacher``, ``ta1``, ``ta2``...: the teacher first, then the assistants from the largest down."""
    return ["teacher", *(f"ta{i}" for i in range(1, count))]


class DGKD(Scheme):
    """A student learning from several frozen teachers at once, some dropped each batch.

    Loss terms are named ``ce`` and ``<method>@<teacher name>`` (e.g. ``hinton@ta1``); a dropped
    teacher's terms are reported as 0 for that batch, so every epoch logs the same keys.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        terms: Sequence[tuple[str, float]],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        num_train: int,
        ce_weight: float = 1.0,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
        label_smoothing: float = 0.0,
        drop_rate: float | None = None,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise UserError("DGKD needs at least one teacher (the teacher, then its assistants)")
        names = list(teacher_names) if teacher_names is not None else default_teacher_names(len(teachers))
        if len(names) != len(teachers) or len(set(names)) != len(names):
            raise ValueError(f"DGKD needs one distinct name per teacher (got {names} for {len(teachers)})")
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.student = student
        self.teacher_names = names
        self.ce_weight = float(ce_weight)
        self.label_smoothing = float(label_smoothing)  # on the hard-label term only (the trainer's setting)
        self.drop_rate = check_drop_rate(drop_rate)
        self.student_taps = FeatureTaps(student, input_shape)
        self.teacher_taps = [FeatureTaps(t, input_shape) for t in self.teachers]
        self.losses = nn.ModuleList(
            knowledge_losses(terms, self.student_taps, taps, num_classes=num_classes, num_train=num_train,
                             loss_options=loss_options)
            for taps in self.teacher_taps
        )
        self.weights = {name: float(w) for name, w in terms}
        # a dropped teacher's learnable loss parts (FitNet regressor...) get no gradient that step
        self.has_unused_parameters = len(self.teachers) > 1 and any(
            p.requires_grad for p in self.losses.parameters()
        )
        self.last_dropped: list[bool] = [False] * len(self.teachers)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        dropped = sample_dropped(len(self.teachers), self.drop_rate)
        self.last_dropped = dropped
        student_out = self.student_taps(batch.x)
        terms: dict[str, Tensor] = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(student_out.logits, batch.y,
                                                           label_smoothing=self.label_smoothing)
        zero = student_out.logits.new_zeros((), dtype=torch.float32)
        for name, taps, losses, skip in zip(self.teacher_names, self.teacher_taps, self.losses, dropped):
            if skip:
                for term in losses:
                    terms[f"{term}@{name}"] = zero
                continue
            with torch.no_grad():
                teacher_out = taps(batch.x)
            for term, loss in losses.items():
                terms[f"{term}@{name}"] = self.weights[term] * loss(student_out, teacher_out, batch)
        return terms

    def frozen_modules(self) -> list[nn.Module]:
        return list(self.teachers)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def deployable(self) -> nn.Module:
        return self.student


@dataclass
class DGKDOptions(SchemeOptions):
    """``teacher_names``: one label per teacher for the loss terms (default teacher, ta1, ...);
    ``drop_rate``: see the module docstring (default: one teacher per batch, the official code's);
    ``loss_options``: per-term hyper-parameters, e.g. ``{"hinton": {"temperature": 4}}``."""

    takes_method = True
    default_method = DEFAULT_METHOD
    knowledge_terms = True

    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    drop_rate: float | None = None
    teacher_names: list[str] | None = None

    def check(self) -> None:
        check_drop_rate(self.drop_rate)


@register_scheme("dgkd", options=DGKDOptions)
def build_dgkd(request: SchemeRequest, student: nn.Module | None = None) -> DGKD:
    """DGKD from a request: ``request.teachers`` are the frozen teachers, largest first (the teacher,
    then the assistants above this stage); ``request.teacher``, when given and not among them, is
    put first, so a request with only ``request.teacher`` is DGKD with one teacher.
    ``request.method`` is the knowledge method spec applied to every teacher (default ``hinton``).
    """
    from compressor.models import create

    teachers = list(request.teachers)
    if request.teacher is not None and not any(t is request.teacher for t in teachers):
        teachers.insert(0, request.teacher)
    if not teachers:
        raise UserError("DGKD needs the teacher and the assistants above the student (--teacher T.pt --chain ...)")
    spec = method_of(request)
    if student is None:
        student = create(request.student_arch, num_classes=request.num_classes, in_chans=request.input_shape[0])
    options: DGKDOptions = request.options  # type: ignore[assignment]
    return DGKD(
        teachers, student, spec.terms, input_shape=request.input_shape, num_classes=request.num_classes,
        num_train=request.num_train, ce_weight=spec.ce_weight, loss_options=loss_options_of(request),
        label_smoothing=request.label_smoothing, drop_rate=options.drop_rate, teacher_names=options.teacher_names,
    )
