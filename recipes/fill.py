"""Students that fill the budget: per scalable family, a member whose width is solved for it.

The zoo grid is coarse: at 1x28x28 nothing in it lies between 0.30 and 2.03 MFLOPs, so the
largest grid member under a 2 MFLOPs budget used 15% of it. Every family that declares a
:class:`compressor.models.WidthScaling` therefore gets one more candidate, its width solved for
the FLOPs/params budgets (depth and every other setting kept from a grid member, the anchor):

  * anchor = the family's largest grid member that fits, solved upwards towards the next grid
    width at its depth (the member the pick rule would have taken, widened to the budget), or
    at most to twice its width past the grid's widest (the grids double widths: no wilder);
  * if none fits, anchor = the family's smallest member, solved downwards to the family's
    narrowest sane width.

Costs are measured, never estimated: every width tried is a name the family's pattern parses,
measured with fvcore through ``compressor.cost.measure_arch`` (cached on disk), and only a
measured width that fits is offered. A model of the cost (a conv whose input and output channels
both scale costs about width squared, so the square root of a cost is about linear in width)
only chooses which width to measure next: interpolation between the bracket's measured ends,
with a bisection step whenever an interpolation left more than half the bracket, at most
``MAX_PROBES`` measurements per family, stopping once a fitting width uses ``GOOD_ENOUGH`` of
the binding budget. Costs never decrease with width (every family rounds channels monotonically),
so the bracket (lo fits, hi does not) stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from compressor.cost import measure_arch
from compressor.models import WidthScaling, resolve, scaling_of
from recipes.budget import Budget, cost_limits
from recipes.search import Candidate, cost_rejections

MAX_PROBES = 8  # fvcore measurements per family, at most
GOOD_ENOUGH = 0.95  # a fitting width that uses this much of the binding budget ends the search


@dataclass
class FillResult:
    members: list[Candidate] = field(default_factory=list)  # one solved member per family that has one
    probes: dict[str, int] = field(default_factory=dict)  # family -> widths measured for it

    @property
    def measurements(self) -> int:
        return sum(self.probes.values())


@dataclass
class _Point:
    """One measured width: k steps of the family's width step."""

    k: int
    flops: int
    params: int
    name: str | None = None  # None for the virtual zero-width end of a downward search


def fill_budget(
    candidates: Sequence[Candidate],
    budgets: Sequence[Budget],
    teacher_flops: int | None,
    num_classes: int,
    input_shape: Sequence[int],
    max_probes: int = MAX_PROBES,
) -> FillResult:
    """One width-solved candidate per scalable family among ``candidates`` (none for latency-only budgets)."""
    result = FillResult()
    if not cost_limits(budgets, teacher_flops):
        return result  # nothing to fill: a latency budget is timed, not solved for
    shape = tuple(int(s) for s in input_shape)
    taken = {c.name for c in candidates}
    for family in sorted({c.family for c in candidates}):
        scaling = scaling_of(family)
        if scaling is None:
            continue
        members = [c for c in candidates if c.family == family]
        solver = _FamilySolver(scaling, budgets, teacher_flops, num_classes, shape, max_probes)
        member = solver.solve(members)
        result.probes[family] = solver.probes
        if member is not None and member.name not in taken:
            result.members.append(member)
            taken.add(member.name)
    return result


class _FamilySolver:
    def __init__(self, scaling: WidthScaling, budgets: Sequence[Budget], teacher_flops: int | None,
                 num_classes: int, shape: tuple[int, ...], max_probes: int) -> None:
        self.scaling, self.budgets, self.teacher_flops = scaling, budgets, teacher_flops
        self.num_classes, self.shape, self.max_probes = num_classes, shape, max_probes
        self.limits = [(metric, limit) for _, metric, limit in cost_limits(budgets, teacher_flops)]
        if teacher_flops is not None:
            self.limits.append(("flops", float(teacher_flops - 1)))  # strictly smaller than the teacher
        self.probes = 0

    def _fits(self, flops: int, params: int) -> bool:
        return not cost_rejections(flops, params, self.budgets, self.teacher_flops)

    def _use(self, point: _Point) -> float:
        """The binding budget's share: the largest cost / ceiling over the budgets."""
        return max((point.flops if m == "flops" else point.params) / limit for m, limit in self.limits)

    def _k(self, width: float) -> int:
        return int(round(width / self.scaling.step))

    def solve(self, members: Sequence[Candidate]) -> Candidate | None:
        key = self.scaling.width_key
        entries = {c.name: resolve(c.name).kwargs for c in members}
        members = [c for c in members if key in entries[c.name]]
        if not members:
            return None
        fitting = [c for c in members if self._fits(c.flops, c.params)]
        if fitting:
            anchor = max(fitting, key=lambda c: (c.flops, -c.params))
            kwargs = entries[anchor.name]
            lo = _Point(self._k(kwargs[key]), anchor.flops, anchor.params, anchor.name)
            if self._use(lo) >= GOOD_ENOUGH:
                return None  # the grid member already fills the budget
            rest = {k: v for k, v in kwargs.items() if k != key}
            wider = [c for c in members if entries[c.name][key] > kwargs[key]
                     and {k: v for k, v in entries[c.name].items() if k != key} == rest]
            hi = None
            if wider:
                nearest = min(wider, key=lambda c: entries[c.name][key])
                hi = _Point(self._k(entries[nearest.name][key]), nearest.flops, nearest.params, nearest.name)
        else:
            anchor = min(members, key=lambda c: (c.flops, c.params))
            kwargs = entries[anchor.name]
            hi = _Point(self._k(kwargs[key]), anchor.flops, anchor.params, anchor.name)
            lowest = math.ceil(self.scaling.min_width / self.scaling.step - 1e-9)
            if lowest >= hi.k:
                return None
            lo = _Point(lowest - 1, 0, 0)  # virtual: the interpolation starts from the origin
        best = self._bisect(kwargs, lo, hi)
        if best is None or best.name == anchor.name:
            return None
        return Candidate(best.name, anchor.family, best.flops, best.params, solved=True)

    def _bisect(self, kwargs: dict, lo: _Point, hi: _Point | None) -> _Point | None:
        best = lo if lo.name is not None else None
        widest = 2 * lo.k  # used only without a measured upper end
        span_before = None
        while self.probes < self.max_probes and (hi is None or hi.k - lo.k > 1):
            span = None if hi is None else hi.k - lo.k
            if span is not None and span_before is not None and 2 * span > span_before + 1:
                k = (lo.k + hi.k) // 2  # the last interpolation left more than half: bisect once
            else:
                k = self._guess(lo, hi)
            k = min(max(k, lo.k + 1), widest if hi is None else hi.k - 1)
            if k <= lo.k:
                break  # already at twice the anchor's width
            span_before = span
            width = round(k * self.scaling.step, 6)
            name = self.scaling.name({**kwargs, self.scaling.width_key: width})
            cost = measure_arch(name, self.num_classes, self.shape)
            self.probes += 1
            point = _Point(k, cost.flops, cost.params, name)
            if self._fits(cost.flops, cost.params):
                lo = best = point
                if self._use(point) >= GOOD_ENOUGH or (hi is None and k >= widest):
                    break
            else:
                hi = point
        return best

    def _guess(self, lo: _Point, hi: _Point | None) -> int:
        """The widest k the sqrt(cost) ~ width model says fits, from the bracket's measured ends."""
        guesses = []
        for metric, limit in self.limits:
            c_lo = math.sqrt(lo.flops if metric == "flops" else lo.params)
            target = math.sqrt(limit)
            k_lo = lo.k if lo.name is not None else 0  # the virtual end is the origin
            if hi is None:
                if c_lo <= 0:
                    continue
                guesses.append(k_lo * target / c_lo)
                continue
            c_hi = math.sqrt(hi.flops if metric == "flops" else hi.params)
            if c_hi <= c_lo:
                continue  # this budget does not vary over the bracket
            guesses.append(k_lo + (target - c_lo) * (hi.k - k_lo) / (c_hi - c_lo))
        if not guesses:
            return lo.k + 1 if hi is None else (lo.k + hi.k) // 2
        return math.floor(min(guesses))
