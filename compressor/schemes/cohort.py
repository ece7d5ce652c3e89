"""Online distillation in a cohort: N peers train together, no pretrained teacher.

The peers are whole networks (same or different architectures) or, for the aggregators whose
paper builds a multi-branch network (``one``, ``pcl``), branches of one architecture over a
shared trunk (:mod:`compressor.schemes.branching`). Each peer learns from the labels; the
aggregator (:mod:`compressor.schemes.aggregators`) forms the training-time teacher and the terms
that tie the peers to it. The deployable is ONE peer, chosen on the validation split.

Options (:class:`CohortOptions`): ``cohort`` (N, default 3), ``aggregator`` (default
``attention``), ``peers`` (architectures, a list or comma-separated; N = their count), and the
aggregator's own hyper-parameters (``temperature``, ``kd_weight``, ``rampup``, ``ema_decay``,
``hidden``: whichever its constructor takes; any other name is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.schemes.aggregators import Aggregator, aggregator_class, aggregator_params, build_aggregator
from compressor.schemes.base import Scheme
from compressor.schemes.branching import NotBranchable
from compressor.schemes.peers import BranchedPeers, PeerGroup, SeparatePeers
from compressor.schemes.registry import REFUSED, SchemeOptions, SchemeRequest, register_scheme
from compressor.typecheck import given
from compressor.schemes.selection import EnsembleView, PeerSelection

DEFAULT_COHORT = 3  # N = 3 in the attention-cohort paper (and ONE's and PCL's CIFAR runs)
DEFAULT_AGGREGATOR = "attention"


class CohortScheme(PeerSelection, Scheme):
    """``sum_i CE(z_i, y)`` plus the aggregator's terms; peers (and PCL's mean peers) are candidates."""

    def __init__(self, group: PeerGroup, aggregator: Aggregator) -> None:
        super().__init__()
        if len(group) < 2:
            raise UserError(f"a cohort needs at least 2 peers, got {len(group)}")
        self.group = group
        self.aggregator = aggregator
        self._init_selection()
        view = None if aggregator.needs_labels else EnsembleView(group, aggregator)
        self.__dict__["_ensemble_view"] = view  # not registered: it only reads the group and aggregator

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = self.group(batch.x)
        losses = {f"ce_{name}": F.cross_entropy(p.logits, batch.y) for name, p in zip(self.group.names, out.peers)}
        agg = self.aggregator(out, batch.y)
        losses.update({f"{self.aggregator.name}_{k}": v for k, v in agg.losses.items()})
        return losses

    def candidate_names(self) -> list[str]:
        return list(self.group.names) + list(self.aggregator.candidates())

    def export_candidate(self, name: str) -> nn.Module:
        if name in self.group.names:
            return self.group.export(self.group.names.index(name))
        return self.aggregator.export_candidate(name)

    def eval_models(self) -> dict[str, nn.Module]:
        models = {name: self.group.peer(i) for i, name in enumerate(self.group.names)}
        models.update(self.aggregator.candidates())
        if self._ensemble_view is not None:
            models["ensemble"] = self._ensemble_view
        return models

    def frozen_modules(self) -> list[nn.Module]:
        return self.aggregator.frozen_modules()

    def after_step(self) -> None:
        self.aggregator.after_step()


def parse_peers(value: Any) -> list[str] | None:
    """``["resnet20", "resnet8"]`` or ``"resnet20,resnet8"`` -> list; None/empty -> None."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    peers = [str(p).strip() for p in items if str(p).strip()]
    return peers or None


@dataclass
class CohortOptions(SchemeOptions):
    """N peers (``cohort`` or ``peers``) and an ``aggregator``; ``extra`` holds the aggregator's own
    hyper-parameters (a name its constructor does not take is refused when the plan is built)."""

    teacher = REFUSED

    cohort: int | None = None
    aggregator: str = DEFAULT_AGGREGATOR
    peers: list[str] | str | None = None

    @classmethod
    def extra_names(cls, given: Mapping[str, Any]) -> list[str]:
        return aggregator_params(str(given.get("aggregator") or DEFAULT_AGGREGATOR))

    def check(self) -> None:
        aggregator_class(self.aggregator)  # an unknown name fails here, with the known ones


def aggregator_options(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregator's hyper-parameters a stage gave (None: its default)."""
    return given(extra)


def build_group(archs: Sequence[str], multi_branch: bool, aggregator: str,
                factory: Callable[[str], nn.Module], input_shape: Sequence[int]) -> PeerGroup:
    """Separate peers, or K branches of one architecture when the aggregator's paper branches."""
    if not multi_branch:
        return SeparatePeers([factory(a) for a in archs], input_shape,
                             names=[f"peer{i}" for i in range(len(archs))])
    if len(set(archs)) > 1:
        raise UserError(
            f"aggregator {aggregator!r} trains branches of ONE architecture over a shared trunk; "
            f"it cannot mix {', '.join(sorted(set(archs)))} (give one student, or use dml, attention, fc or wavg)"
        )
    try:
        return BranchedPeers(lambda: factory(archs[0]), len(archs), input_shape)
    except NotBranchable as err:
        raise UserError(f"aggregator {aggregator!r} needs a branchable network: {err}") from None


def cohort_archs(request: SchemeRequest) -> list[str]:
    """The peers' architectures from ``peers`` / ``cohort`` / the student; N < 2 is refused."""
    options = request.options
    peers = parse_peers(options.peers)
    size = options.cohort
    if peers is not None:
        if size is not None and int(size) != len(peers):
            raise UserError(f"--cohort {size} does not match the {len(peers)} architectures in --peers")
        archs = peers
    else:
        n = DEFAULT_COHORT if size is None else int(size)
        archs = [request.student_arch] * max(n, 0)
    if len(archs) < 2:
        raise UserError(f"a cohort needs at least 2 peers, got {len(archs)}: use --cohort 2 or more")
    return archs


@register_scheme("cohort", options=CohortOptions)
def build_cohort(request: SchemeRequest) -> CohortScheme:
    """N peers and an aggregator; no teacher. See the module docstring for the options."""
    from compressor.models import create

    if request.teacher is not None:
        raise UserError("the cohort scheme trains without a teacher: drop --teacher, or use --scheme modreduce")
    archs = cohort_archs(request)
    options: CohortOptions = request.options  # type: ignore[assignment]
    name = options.aggregator
    cls = aggregator_class(name)

    def factory(arch: str) -> nn.Module:
        return create(arch, num_classes=request.num_classes, in_chans=request.input_shape[0])

    group = build_group(archs, cls.multi_branch, name, factory, request.input_shape)
    info = group.info(request.num_classes, request.input_shape)
    aggregator = build_aggregator(name, info, group, **aggregator_options(options.extra))
    return CohortScheme(group, aggregator)
