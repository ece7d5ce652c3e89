"""Student search: which zoo models fit every budget, measured (fvcore; onnxruntime for latency).

Pick rule (documented in the README): restrict to ``--family`` if given; otherwise prefer the
teacher's family when one of its members fits (a student of the same family inherits the
teacher's inductive biases, which makes feature distillation easiest); then take the member
with the most FLOPs that fits (capacity is what distillation cannot add), fewer params on ties.
The candidates are the zoo grid plus, per scalable family, a member whose width was solved for
the budget (recipes.fill), so the pick can use most of the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from compressor.cost import measure_arch
from compressor.errors import UserError
from compressor.models import list_models, model_family
from recipes.budget import Budget, cost_limits

LatencyFn = Callable[[str], float]  # arch name -> batch-1 latency in ms on this machine


@dataclass
class Candidate:
    name: str
    family: str
    flops: int
    params: int
    latency_ms: float | None = None
    rejected_by: list[str] = field(default_factory=list)  # the budgets it breaks
    timed: bool = False
    solved: bool = False  # a width solved for this budget (recipes.fill), not a grid member
    utilization: dict[str, float] = field(default_factory=dict)  # budget text -> cost / limit
    pruned: dict | None = None  # the teacher pruned to the budget (recipes.pruned): its pruning record

    def uses(self, budgets: Sequence[Budget]) -> str:
        """``uses 93% of <= 2 MFLOPs``: how much of each FLOPs/params budget this candidate takes."""
        parts = [f"{self.utilization[b.text]:.0%} of {b.limit_text()}" for b in budgets if b.text in self.utilization]
        return f"uses {', '.join(parts)}" if parts else ""

    @property
    def fits(self) -> bool:
        return not self.rejected_by

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}  # a pruned candidate keeps its history: the probe rebuilds it


def measure_candidates(
    num_classes: int, input_shape: Sequence[int], families: Sequence[str] | None = None
) -> list[Candidate]:
    """Every searchable zoo model at this data's shape and class count (cached on disk)."""
    shape = tuple(int(s) for s in input_shape)
    out = []
    for name in list_models(searchable_only=True):
        family = model_family(name)
        if families and family not in families:
            continue
        cost = measure_arch(name, num_classes, shape)
        out.append(Candidate(name, family, cost.flops, cost.params))
    return out


def cost_rejections(flops: int, params: int, budgets: Sequence[Budget], teacher_flops: int | None) -> list[str]:
    """What a measured cost breaks: a student is never as large as its teacher, nor over a budget.

    Latency is no cost here: it is timed (``apply_budgets``), never derived from FLOPs.
    """
    out = ["not smaller than the teacher"] if teacher_flops is not None and flops >= teacher_flops else []
    for text, metric, limit in cost_limits(budgets, teacher_flops):
        if (flops if metric == "flops" else params) > limit:
            out.append(text)
    return out


def utilization(flops: int, params: int, budgets: Sequence[Budget], teacher_flops: int | None) -> dict[str, float]:
    """Budget text -> the fraction of its ceiling this cost takes (FLOPs and params budgets only)."""
    return {text: (flops if metric == "flops" else params) / limit
            for text, metric, limit in cost_limits(budgets, teacher_flops)}


def apply_budgets(
    candidates: list[Candidate],
    budgets: Sequence[Budget],
    teacher_flops: int | None,
    latency: LatencyFn | None = None,
    max_timed_per_family: int = 4,
) -> None:
    """Mark each candidate with the budgets it breaks (and whether it is smaller than the teacher)
    and with how much of each FLOPs/params budget it uses; latency is timed, never estimated.

    Latency is measured only for the largest survivors of the other budgets, family by family,
    until one meets it (at most ``max_timed_per_family`` per family); the untimed members are
    marked as such and never picked.
    """
    for c in candidates:
        c.utilization = utilization(c.flops, c.params, budgets, teacher_flops)
        c.rejected_by += [r for r in cost_rejections(c.flops, c.params, budgets, teacher_flops)
                          if r not in c.rejected_by]
    latency_budgets = [b for b in budgets if b.timed]
    if not latency_budgets:
        return
    if latency is None:
        raise UserError("a latency budget needs the latency probe (onnxruntime) and none was given")
    limit = min(b.value for b in latency_budgets)
    text = next(b.text for b in latency_budgets if b.value == limit)
    by_family: dict[str, list[Candidate]] = {}
    for c in candidates:
        if c.fits:
            by_family.setdefault(c.family, []).append(c)
    for members in by_family.values():
        members.sort(key=lambda c: -c.flops)
        found = False
        for i, c in enumerate(members):
            if found or i >= max_timed_per_family:
                c.rejected_by.append(f"{text} (not timed)")
                continue
            if not c.timed:  # the pruned candidate is timed as the module it is (recipes.pruned)
                c.latency_ms, c.timed = latency(c.name), True
            if c.latency_ms > limit:
                c.rejected_by.append(text)
            else:
                found = True


def check_budget_range(candidates: list[Candidate], budgets: Sequence[Budget], teacher_flops: int | None,
                       teacher_params: int | None) -> None:
    """The two user mistakes worth a precise answer: a budget below every model, or above the teacher."""
    if teacher_flops is not None:
        teacher_cost = {"flops": teacher_flops, "params": teacher_params}
        for _, metric, limit in cost_limits(budgets, teacher_flops):
            roomy = teacher_cost.get(metric) is not None and limit >= teacher_cost[metric]
            if roomy and len(budgets) == 1:
                suggestion = (f"{teacher_params / 4 / 1e6:.3g}Mparams" if metric == "params"
                              else f"{teacher_flops / 4 / 1e6:.3g}MFLOPs")
                b = budgets[0]
                raise UserError(
                    f"budget {b.text!r} already allows the teacher itself ({teacher_flops / 1e6:.1f} MFLOPs, "
                    f"{(teacher_params or 0) / 1e6:.3f} M params); ask for less, e.g. --budget {suggestion}"
                )
    if candidates and not any(c.fits for c in candidates):
        smallest = min(candidates, key=lambda c: (c.flops, c.params))
        broken = ", ".join(sorted({t for c in candidates for t in c.rejected_by}))
        cost = f"{smallest.flops / 1e6:.2f} MFLOPs, {smallest.params / 1e6:.3f} M params"
        if smallest.latency_ms is not None:
            cost += f", {smallest.latency_ms:.2f} ms"
        raise UserError(f"no student fits {broken}: the smallest candidate, {smallest.name}, costs {cost}")


def pick(candidates: list[Candidate], teacher_family: str | None, family: str | None = None) -> tuple[Candidate, str]:
    """The chosen student and the sentence that explains why."""
    fitting = [c for c in candidates if c.fits]
    if family is not None:
        pool = [c for c in fitting if c.family == family]
        if not pool:
            members = [c for c in candidates if c.family == family]
            if not members:
                raise UserError(f"no searchable family {family!r}; families: {', '.join(sorted({c.family for c in candidates}))}")
            smallest = min(members, key=lambda c: c.flops)
            raise UserError(f"no {family} member fits; its smallest, {smallest.name}, costs {smallest.flops / 1e6:.2f} MFLOPs")
        why = f"--family {family}"
    elif teacher_family is not None and any(c.family == teacher_family for c in fitting):
        pool = [c for c in fitting if c.family == teacher_family]
        why = f"the teacher's family ({teacher_family}) has members that fit"
    else:
        pool = fitting
        why = "the teacher's family has no member that fits" if teacher_family else "no teacher family to prefer"
    best = max(pool, key=lambda c: (c.flops, -c.params))
    detail = f"{best.flops / 1e6:.2f} MFLOPs, {best.params / 1e6:.3f} M params"
    if best.latency_ms is not None:
        detail += f", {best.latency_ms:.2f} ms"
    return best, f"student {display_name(best.name)}, {detail}: {why}; the largest of {len(pool)} fitting members"


def display_name(name: str) -> str:
    """``resnet_d20_w1 (resnet20)``: the systematic name with the benchmark alias people know."""
    from compressor.models import aliases_of

    aliases = [a for a in aliases_of(name) if a != name]
    return f"{name} ({', '.join(aliases)})" if aliases else name


def teacher_family_of(arch: str | None) -> str | None:
    if not arch:
        return None
    try:
        return model_family(arch)
    except UserError:
        return None  # a foreign model: no family to prefer
