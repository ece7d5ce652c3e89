"""The aggregator contract and its registry.

An aggregator turns the peers' outputs for one batch into an ensemble (a training-time teacher)
and the loss terms that tie the peers to it. It never adds the peers' own cross-entropy: the
scheme does (the cohort once per peer; ModReduce inside its offline phase), so no term is
counted twice. What a peer mimics is always detached where the method's paper (or its authors'
code) stops the gradient; each aggregator's docstring says where.

Adding an aggregator is one module in this package with ``@register_aggregator("name")``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from compressor.errors import UserError
from compressor.knowledge.hinton import soft_kl
from compressor.schemes.peers import CohortInfo, GroupOutputs, PeerGroup


@dataclass
class Aggregate:
    """The ensemble's logits for the batch (None when the method forms none) and its loss terms."""

    logits: Tensor | None
    losses: dict[str, Tensor] = field(default_factory=dict)


class Aggregator(nn.Module):
    """Subclass, set the class attributes, take ``(info, **hyper-parameters)``, implement forward."""

    name: ClassVar[str] = ""
    # the paper builds a multi-branch network (a shared trunk): the cohort scheme must branch its student
    multi_branch: ClassVar[bool] = False
    # the ensemble needs the labels (so it exists only in training and cannot be evaluated)
    needs_labels: ClassVar[bool] = False
    default_temperature: ClassVar[float] = 1.0

    def __init__(self, info: CohortInfo, temperature: float | None = None, kd_weight: float = 1.0) -> None:
        super().__init__()
        if info.num_peers < 2:
            raise UserError(f"aggregator {self.name!r} needs at least 2 peers, got {info.num_peers}")
        self.info = info
        self.temperature = float(temperature if temperature is not None else self.default_temperature)
        if self.temperature <= 0:
            raise UserError(f"aggregator {self.name!r}: temperature must be positive, got {temperature}")
        self.kd_weight = float(kd_weight)

    def bind(self, group: PeerGroup) -> None:
        """See the peers once at construction (PCL copies them into its temporal-mean teachers)."""

    def forward(self, out: GroupOutputs, y: Tensor) -> Aggregate:
        raise NotImplementedError

    def ensemble(self, out: GroupOutputs) -> Tensor:
        """The ensemble's logits without labels (for reporting its accuracy); not for ``needs_labels``."""
        raise NotImplementedError

    def distill(self, peer_logits: list[Tensor], target_logits: Tensor) -> Tensor:
        """sum_i T^2 KL(softmax(target / T) || softmax(z_i / T)); the target is detached."""
        t = self.temperature
        return sum(soft_kl(z, target_logits, t) for z in peer_logits) * (t * t)

    # --- hooks the scheme forwards ------------------------------------------------------------
    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the scheme before each epoch (0-based, of ``num_epochs``): ramp-ups (ONE, PCL)."""

    def after_step(self) -> None:
        """Called after each optimiser step (temporal means)."""

    def frozen_modules(self) -> list[nn.Module]:
        """Parts that never train by gradient (kept in eval mode)."""
        return []

    def candidates(self) -> dict[str, nn.Module]:
        """Extra deployable candidates besides the peers (PCL's temporal-mean peers), name -> live model."""
        return {}

    def export_candidate(self, name: str) -> nn.Module:
        raise KeyError(name)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """exp(-5 (1 - e/L)^2) until epoch L, then 1 (Laine & Aila 2017; ONE's and PCL's code)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class RampUp:
    """The consistency weight w(epoch) of ONE / PCL, over ``fraction`` of the run (80 of 300 epochs).

    Before the trainer announces an epoch (a hand-written loop, a test) the weight is 1.
    """

    def __init__(self, fraction: float) -> None:
        if not 0 <= fraction <= 1:
            raise UserError(f"rampup must be a fraction of the epochs in [0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.weight = 1.0

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        self.weight = sigmoid_rampup(epoch, self.fraction * num_epochs)


def mean_probabilities(logits: list[Tensor]) -> Tensor:
    return torch.stack([torch.softmax(z.float(), dim=1) for z in logits]).mean(dim=0)


AggregatorClass = type[Aggregator]
_AGGREGATORS: dict[str, AggregatorClass] = {}


def register_aggregator(name: str) -> Callable[[AggregatorClass], AggregatorClass]:
    def decorator(cls: AggregatorClass) -> AggregatorClass:
        if name in _AGGREGATORS:
            raise ValueError(f"aggregator {name!r} registered twice")
        cls.name = name
        _AGGREGATORS[name] = cls
        return cls

    return decorator


def aggregator_class(name: str) -> AggregatorClass:
    _ensure_loaded()
    if name not in _AGGREGATORS:
        close = difflib.get_close_matches(name, list(_AGGREGATORS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown aggregator {name!r}{hint}; known: {', '.join(list_aggregators())}")
    return _AGGREGATORS[name]


def aggregator_params(name: str) -> list[str]:
    """The hyper-parameters aggregator ``name`` takes (its constructor's, after ``info``): what a
    plan stage may set for it beside the scheme's own options."""
    params = inspect.signature(aggregator_class(name).__init__).parameters
    return [k for k, p in params.items() if k not in ("self", "info")
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def build_aggregator(name: str, info: CohortInfo, group: PeerGroup | None = None, **hparams: Any) -> Aggregator:
    """Build by name; ``hparams`` the aggregator does not take are a user error naming them.

    The keywords are checked against the constructor's signature BEFORE it runs, so a TypeError
    raised inside a constructor (a bug) keeps its traceback instead of passing for a user mistake.
    """
    cls = aggregator_class(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = aggregator_params(name)
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise UserError(f"aggregator {name!r} takes no option {', '.join(map(repr, unknown))}; "
                            f"it takes {', '.join(accepted) or 'none'}")
    agg = cls(info, **hparams)
    if group is not None:
        agg.bind(group)
    return agg


def list_aggregators() -> list[str]:
    _ensure_loaded()
    return sorted(_AGGREGATORS)


def _ensure_loaded() -> None:
    import compressor.schemes.aggregators  # noqa: F401
