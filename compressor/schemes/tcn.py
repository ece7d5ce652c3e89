"""The teacher-class network (Malik et al., BMVC 2021, arXiv:2004.03281) and its hierarchical variant.

One stage, two phases, both through the one trainer (the phase is a pure function of the epoch,
so a resumed run is in the phase the uninterrupted run was in):

1. Regression, epochs ``[0, E - k)``: the frozen teacher's dense embedding (the vector its
   classifier reads, from the feature taps) is cut into n contiguous chunks (remainder spread
   one dimension each to the first chunks: :func:`compressor.models.teacher_class.chunk_sizes`);
   student i minimises ``MSE(student_i(x), chunk_i(teacher(x)))``. The n terms involve disjoint
   parameters, so summing them trains each student exactly as if alone (the authors train them
   one by one). Loss terms: ``mse_0 ... mse_{n-1}``.
2. Fine-tuning, the last ``k = finetune_epochs`` epochs: ``CE(output(concat(students(x))), y)``.
   The output layer, initialised from the teacher's classifier, trains when ``finetune_output``
   (default True); the students stay frozen (eval-mode BN, no gradient) unless
   ``finetune_students`` (the authors freeze every layer but the output layer). Loss term: ``ce``.

The deployable is the whole :class:`~compressor.models.teacher_class.TeacherClassEnsemble`,
named ``tcn<n>_d<D>_<student>`` in the zoo so its checkpoint rebuilds it; its accuracy is what the
trainer validates every epoch, in both phases.

The learning-rate schedule runs over the whole stage, so fine-tuning happens at the schedule's
tail; the authors use Adam at a constant 2e-4 for both phases (``TCN_TRAIN_DEFAULTS``), with
which the phases see the same rate. ``k`` defaults to ``round(E / 7)``, the seed paper's split
(60 epochs of regression, 10 of fine-tuning), at least 1 when ``E >= 2``.

Hierarchical variant (the seed paper, teaching-assistant-dense-feature-kd): teacher -> 1 -> 2 ->
4 -> ... students, each level regressing the chunks of the concatenated embedding of the level
above. Each level is one plan stage of this scheme whose teacher is the previous stage's
ensemble (its feature taps return the concatenation); :func:`tcn_levels` lists the stages.
With doubling counts and a divisible dimension, chunk i of level l+1 is exactly half of
student i // 2's output at level l, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.models.teacher_class import TeacherClassEnsemble, chunk_sizes, ensemble_arch_name
from compressor.schemes.base import Scheme
from compressor.schemes.offline import freeze
from compressor.schemes.registry import SchemeOptions, SchemeRequest, register_scheme

REGRESS, FINETUNE = "regress", "finetune"
# the authors' optimiser for both phases (Adam, lr 2e-4, no schedule): the lead's plan may use it
TCN_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "adam", "lr": 2e-4, "schedule": "constant", "weight_decay": 0.0}
SEED_PAPER_FINETUNE_SHARE = 10 / 70  # 60 epochs of regression, 10 of fine-tuning


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{name} must be a whole number >= 0 (got {value!r})")
    return value


def default_finetune_epochs(num_epochs: int) -> int:
    if num_epochs < 2:
        return 0
    return max(1, round(num_epochs * SEED_PAPER_FINETUNE_SHARE))


class TeacherClass(Scheme):
    has_unused_parameters = True  # the output layer idles while regressing, the students while fine-tuning

    def __init__(
        self,
        teacher: nn.Module,
        ensemble: TeacherClassEnsemble,
        *,
        input_shape: Sequence[int],
        finetune_epochs: int | None = None,
        finetune_output: bool = True,
        finetune_students: bool = False,
        init_output: bool = True,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.ensemble = ensemble
        self.teacher_taps = FeatureTaps(teacher, input_shape)
        self.ensemble_taps = FeatureTaps(ensemble, input_shape)
        dim = self.teacher_taps.layout().embedding_dim
        if dim != ensemble.embedding_dim:
            raise UserError(
                f"the teacher's embedding has {dim} dimensions but the students' chunks add up to "
                f"{ensemble.embedding_dim}: build the ensemble for this teacher"
            )
        if init_output:
            classifier = dict(teacher.named_modules())[self.teacher_taps.classifier_name]
            ensemble.init_output_from(classifier)
        self.finetune_epochs = None if finetune_epochs is None else _whole(finetune_epochs, "finetune_epochs")
        self.finetune_output = bool(finetune_output)
        self.finetune_students = bool(finetune_students)
        self.label_smoothing = float(label_smoothing)
        ensemble.output.requires_grad_(self.finetune_output)
        self.phase = REGRESS

    def phase_of(self, epoch: int, num_epochs: int) -> str:
        """``regress`` or ``finetune`` for a 0-based epoch of a ``num_epochs`` run."""
        k = default_finetune_epochs(num_epochs) if self.finetune_epochs is None else self.finetune_epochs
        if k >= num_epochs:
            raise UserError(
                f"the teacher-class stage has {num_epochs} epochs and fine-tunes for {k}: leave at least "
                "one epoch for the students to learn the teacher's embedding"
            )
        if k and not (self.finetune_output or self.finetune_students):
            raise UserError(
                "fine-tuning epochs were asked for but neither the output layer nor the students may "
                "train: set finetune_output or finetune_students, or finetune_epochs: 0"
            )
        return FINETUNE if epoch >= num_epochs - k else REGRESS

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        super().start_epoch(epoch, num_epochs)
        self.phase = self.phase_of(epoch, num_epochs)
        students_train = self.phase == REGRESS or self.finetune_students
        self.ensemble.students.requires_grad_(students_train)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if self.phase == FINETUNE:
            logits = self.ensemble(batch.x)
            return {"ce": F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)}
        with torch.no_grad():
            target = self.teacher_taps(batch.x).embedding
        pieces = self.ensemble_taps(batch.x).embedding.split(self.ensemble.chunks, dim=1)
        wanted = target.split(self.ensemble.chunks, dim=1)
        return {f"mse_{i}": F.mse_loss(p.float(), t.float()) for i, (p, t) in enumerate(zip(pieces, wanted))}

    def frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = [self.teacher]
        if self.phase == FINETUNE and not self.finetune_students:
            frozen.append(self.ensemble.students)
        return frozen

    def eval_models(self) -> dict[str, nn.Module]:
        return {"ensemble": self.ensemble}

    def deployable(self) -> nn.Module:
        return self.ensemble


def embedding_dim(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Dimension of the vector a model's classifier reads (one dry forward; hooks removed after)."""
    taps = FeatureTaps(model, input_shape)
    try:
        return taps.layout().embedding_dim
    finally:
        taps.remove()


@dataclass
class TCNOptions(SchemeOptions):
    """``students`` (n, default 2), ``finetune_epochs`` (default round(E/7)), ``finetune_output``
    (default True), ``finetune_students`` (default False). ``hierarchical`` is how a plan asks for
    one stage per level (the planner writes them, :func:`tcn_levels`); one stage refuses it."""

    train_defaults = TCN_TRAIN_DEFAULTS

    students: int = 2
    finetune_epochs: int | None = None
    finetune_output: bool = True
    finetune_students: bool = False
    hierarchical: bool = False

    def check(self) -> None:
        if self.hierarchical:
            raise UserError(
                "a tcn stage trains one level of a teacher-class network; the hierarchical variant is one tcn stage "
                "per level (tcn1 from the teacher, tcn2 from tcn1, ...): `kdcompress distill --scheme tcn "
                "--hierarchical` writes them, or write them in the plan"
            )


@register_scheme("tcn", options=TCNOptions)
def build_tcn(request: SchemeRequest) -> TeacherClass:
    """A teacher-class stage.

    ``request.teacher``: the frozen teacher, or the previous level's ensemble (hierarchical).
    ``request.student_arch``: the zoo architecture of every student; the options are
    :class:`TCNOptions`. No method: the objective is the paper's (MSE on chunks, then CE).
    """
    from compressor.models import create

    if request.teacher is None:
        raise UserError("the teacher-class network needs a teacher (--teacher T.pt)")
    options: TCNOptions = request.options  # type: ignore[assignment]
    students = options.students
    dim = embedding_dim(request.teacher, request.input_shape)
    chunk_sizes(dim, students)  # a count that cannot share the embedding fails here, before building
    arch = ensemble_arch_name(students, dim, request.student_arch)
    ensemble = create(arch, num_classes=request.num_classes, in_chans=request.input_shape[0])
    return TeacherClass(
        request.teacher, ensemble, input_shape=request.input_shape,
        finetune_epochs=options.finetune_epochs,
        finetune_output=options.finetune_output,
        finetune_students=options.finetune_students,
        label_smoothing=request.label_smoothing,
    )


@dataclass(frozen=True)
class TcnLevel:
    """One plan stage of a (hierarchical) teacher-class network."""

    name: str  # the stage name
    students: int  # students at this level
    teacher: str  # "teacher" or the name of the level above


def tcn_levels(students: int, hierarchical: bool = False) -> list[TcnLevel]:
    """The stages a ``--scheme tcn --students n [--hierarchical]`` run trains, in order.

    Flat: one stage ``tcn`` of n students learning from the teacher. Hierarchical: ``tcn1`` (one
    student learning the whole embedding from the teacher), then ``tcn2``, ``tcn4``, ... up to n,
    each learning from the level above; n must be a power of two.
    """
    if isinstance(students, bool) or not isinstance(students, int) or students < 1:
        raise UserError(f"the teacher-class network needs at least 1 student (got {students!r})")
    if not hierarchical:
        return [TcnLevel("tcn", students, "teacher")]
    if students & (students - 1):
        raise UserError(
            f"a hierarchical teacher-class network doubles its students at every level (1, 2, 4, 8, ...): "
            f"{students} is not a power of two"
        )
    levels, count, above = [], 1, "teacher"
    while count <= students:
        levels.append(TcnLevel(f"tcn{count}", count, above))
        above, count = f"tcn{count}", count * 2
    return levels
