"""ModReduce (multi-knowledge distillation with online learning): offline + online in each step.

A frozen teacher and three students of one architecture. Every step runs

* the offline phase: each student learns one kind of knowledge from the teacher, next to its
  labels: student 1 response knowledge (Hinton KD), student 2 feature knowledge (SemCKD + KD),
  student 3 relational knowledge (CRD + KD) (ModReduce Sec. 3.2);
* the online phase: an aggregator shares what the three learnt among them (Sec. 3.3): ``wavg``
  (the paper's best), ``pcl``, ``one`` or ``fc`` (any registered aggregator is accepted).

Weights as in the paper's benchmark (App. A.3 and the SemCKD/CRD runs it re-ran): every student
has CE weight 1 and KD weight 1 at T = 4; SemCKD beta = 400; CRD 0.8; the online terms use the same
T = 4 with weight 1. The two phases' losses are summed into one optimiser step (the trainer takes
one step per batch), which is the paper's "performed consecutively at each training step" with
both gradients taken at the same weights.

The deployable is the best student on the validation split; every student's accuracy and the
aggregate's (when it needs no labels) are reported each epoch.

Training protocol (App. A.3): SGD with NESTEROV momentum 0.9, lr 0.05 (0.01 for MobileNetV2 and
ShuffleNets), 240 epochs, lr / 10 at 150, 180 and 210, batch 64, weight decay 5e-4: the CRD benchmark's
protocol with Nesterov momentum. :data:`MODREDUCE_TRAIN_DEFAULTS` is what a ModReduce stage adds
to the dataset's protocol (the planner and ``kdcompress distill --scheme modreduce`` apply it).

The knowledge each student learns is fixed by the method (above), so a stage's ``method`` is
refused rather than recorded and ignored; the weights are the options below.

Options (:class:`ModReduceOptions`): ``aggregator`` (wavg), ``temperature`` (4), ``hinton_weight``
(1), ``semckd_weight`` (400), ``crd_weight`` (0.8), ``online_weight`` (1), ``peers`` (three
architectures, default three of the student), and the aggregator's own hyper-parameters. SemCKD's
similarity size is the request's per-process batch size (64 when none is given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.knowledge import LossContext, build_loss
from compressor.knowledge.spec import MethodSpec
from compressor.schemes.aggregators import Aggregator, aggregator_class, aggregator_params, build_aggregator
from compressor.schemes.base import Scheme
from compressor.schemes.cohort import aggregator_options, parse_peers
from compressor.schemes.peers import SeparatePeers
from compressor.schemes.registry import SchemeOptions, SchemeRequest, register_scheme
from compressor.schemes.selection import EnsembleView, PeerSelection

TEMPERATURE = 4.0
# (student name, its offline losses) in the paper's order: response, feature, relation knowledge
STUDENTS = (
    ("hinton", ("hinton",)),
    ("semckd", ("hinton", "semckd")),
    ("crd", ("hinton", "crd")),
)
DEFAULT_WEIGHTS = {"hinton": 1.0, "semckd": 400.0, "crd": 0.8}
DEFAULT_AGGREGATOR = "wavg"
MODREDUCE_TRAIN_DEFAULTS = {"nesterov": True}  # App. A.3: "stochastic gradient descent with a Nesterov momentum of 0.9"


@dataclass
class ModReduceOptions(SchemeOptions):
    """The weights of the three students' fixed knowledge and of the online phase, the aggregator
    and the peers; ``extra`` holds the aggregator's own hyper-parameters."""

    knowledge_terms = True
    train_defaults = MODREDUCE_TRAIN_DEFAULTS

    aggregator: str = DEFAULT_AGGREGATOR
    temperature: float | None = None
    hinton_weight: float | None = None
    semckd_weight: float | None = None
    crd_weight: float | None = None
    online_weight: float | None = None
    peers: list[str] | str | None = None
    cohort: int | None = None  # only 3, the students' count, is accepted (a cohort flag given by habit)

    @classmethod
    def extra_names(cls, given: Mapping[str, Any]) -> list[str]:
        return [n for n in aggregator_params(str(given.get("aggregator") or DEFAULT_AGGREGATOR)) if n != "temperature"]

    def check(self) -> None:
        aggregator_class(self.aggregator)  # an unknown name fails here, before anything is sized
        if self.cohort is not None and self.cohort != len(STUDENTS):
            raise UserError(f"modreduce trains exactly {len(STUDENTS)} students; drop --cohort {self.cohort}")

    @classmethod
    def refuse_method(cls, scheme: str, method: MethodSpec) -> None:
        check_no_method(method.text)


def check_no_method(method: str | None) -> None:
    """ModReduce's students learn fixed knowledge; a method spec would be recorded and ignored."""
    if method:
        raise UserError(
            f"modreduce trains three students with fixed knowledge (Hinton KD; SemCKD + KD; CRD + KD) and takes no "
            f"--method (got {method!r}): drop it, and set the weights with the hinton_weight, semckd_weight and "
            "crd_weight options"
        )


class ModReduce(PeerSelection, Scheme):
    """Three students, each with its offline losses, plus one online aggregator among them."""

    def __init__(self, teacher: nn.Module, students: SeparatePeers, offline: list[nn.ModuleDict],
                 weights: list[dict[str, float]], aggregator: Aggregator, input_shape: tuple[int, ...],
                 online_weight: float = 1.0) -> None:
        super().__init__()
        if not (len(students) == len(offline) == len(weights)):
            raise ValueError("one offline loss set per student")
        self.teacher = teacher
        self.students = students
        self.offline = nn.ModuleList(offline)
        self.weights = [dict(w) for w in weights]
        self.aggregator = aggregator
        self.online_weight = float(online_weight)
        self._teacher_taps = FeatureTaps(teacher, input_shape)
        self._init_selection()
        view = None if aggregator.needs_labels else EnsembleView(students, aggregator)
        self.__dict__["_aggregate_view"] = view

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            t_out = self._teacher_taps(batch.x)
        out = self.students(batch.x)
        losses: dict[str, Tensor] = {}
        for name, s_out, terms, weights in zip(self.students.names, out.peers, self.offline, self.weights):
            losses[f"{name}_ce"] = F.cross_entropy(s_out.logits, batch.y)
            for loss_name, loss in terms.items():
                losses[f"{name}_{loss_name}"] = weights[loss_name] * loss(s_out, t_out, batch)
        agg = self.aggregator(out, batch.y)
        for key, value in agg.losses.items():
            losses[f"online_{key}"] = self.online_weight * value
        return losses

    def candidate_names(self) -> list[str]:
        return list(self.students.names)

    def export_candidate(self, name: str) -> nn.Module:
        return self.students.export(self.students.names.index(name))

    def eval_models(self) -> dict[str, nn.Module]:
        models = {name: self.students.peer(i) for i, name in enumerate(self.students.names)}
        view = self.__dict__["_aggregate_view"]
        if view is not None:
            models["aggregate"] = view
        return models

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher, *self.aggregator.frozen_modules()]

    def after_step(self) -> None:
        self.aggregator.after_step()


def _weights(options: ModReduceOptions) -> dict[str, float]:
    """Each offline loss's weight: ``<loss>_weight`` from the options, else the paper's."""
    given = {name: getattr(options, f"{name}_weight") for name in DEFAULT_WEIGHTS}
    return {name: float(default if given[name] is None else given[name]) for name, default in DEFAULT_WEIGHTS.items()}


@register_scheme("modreduce", options=ModReduceOptions)
def build_modreduce(request: SchemeRequest) -> ModReduce:
    """A frozen teacher (required) and three students; see the module docstring for the options."""
    from compressor.models import create

    if request.teacher is None:
        raise UserError("modreduce distils a frozen teacher into three students: give --teacher T.pt")
    options: ModReduceOptions = request.options  # type: ignore[assignment]
    archs = parse_peers(options.peers) or [request.student_arch] * len(STUDENTS)
    if len(archs) != len(STUDENTS):
        raise UserError(f"modreduce trains exactly {len(STUDENTS)} students (Hinton, SemCKD, CRD), "
                        f"got {len(archs)} architectures in --peers")
    shape = tuple(request.input_shape)
    teacher = request.teacher
    teacher.requires_grad_(False)
    teacher.eval()
    t_layout = FeatureTaps(teacher, shape).layout(shape)
    weights = _weights(options)
    temperature = float(options.temperature or TEMPERATURE)
    models, offline, loss_weights = [], [], []
    for arch, (_, terms) in zip(archs, STUDENTS):
        model = create(arch, num_classes=request.num_classes, in_chans=shape[0])
        probe = FeatureTaps(model, shape)
        ctx = LossContext(probe.layout(shape), t_layout, request.num_classes, request.num_train)
        probe.remove()
        losses = nn.ModuleDict()
        for loss_name in terms:
            hparams: dict[str, Any] = {}
            if loss_name == "hinton":
                hparams["temperature"] = temperature
            elif loss_name == "semckd":
                hparams["batch_size"] = int(request.batch_size or 64)
            losses[loss_name] = build_loss(loss_name, ctx, **hparams)
        models.append(model)
        offline.append(losses)
        loss_weights.append({name: weights[name] for name in terms})
    names = [f"s{i + 1}_{label}" for i, (label, _) in enumerate(STUDENTS)]
    students = SeparatePeers(models, shape, names=names)
    agg_name = options.aggregator
    agg_options = aggregator_options({**options.extra, "temperature": temperature})
    info = students.info(request.num_classes, shape)
    aggregator = build_aggregator(agg_name, info, students, **agg_options)
    online_weight = float(options.online_weight if options.online_weight is not None else 1.0)
    return ModReduce(teacher, students, offline, loss_weights, aggregator, shape, online_weight)
