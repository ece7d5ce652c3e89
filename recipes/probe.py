"""`--search probe`: let the data choose among the fitting students (successive halving).

The top-k fitting candidates (most FLOPs first, the rule's favourites) are each distilled
briefly from the teacher on a subset of the training split with the plan's method and
scored on the validation split; the better half go on to a round twice as long, until one is
left. Scores are validation top-1, never test. The winner replaces the rule's pick.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from compressor.errors import UserError
from recipes.context import RunInputs
from recipes.plan import TEACHER, Plan

PROBE_EPOCHS = 1  # first round; doubled each round
PROBE_FRACTION = 0.5  # of the training split per probe


def probe_search(plan: Plan, inputs: RunInputs, *, k: int = 4, device: str = "auto",
                 echo: Callable[[str], None] = print) -> tuple[str, list[dict[str, Any]]]:
    from compressor.schemes import SchemeRequest, build_scheme
    from compressor.trainer import NotLearning, TrainConfig, fit, seed_everything

    if inputs.teacher is None:
        raise UserError("--search probe distils from a teacher: give --teacher")
    fitting = sorted((c for c in plan.candidates if c.get("fits")), key=lambda c: -c["flops"])[:max(1, k)]
    field = [c["name"] for c in fitting]
    by_name = {c["name"]: c for c in fitting}
    source = ProbeView(inputs.source, PROBE_FRACTION)
    final = plan.final
    rows: list[dict[str, Any]] = []
    rounds = max(1, math.ceil(math.log2(len(field)))) if len(field) > 1 else 1
    epochs = PROBE_EPOCHS
    for round_number in range(1, rounds + 1):
        scores = {}
        for arch in field:
            echo(f"probe round {round_number}/{rounds}: {arch} for {epochs} epoch(s)")
            request = SchemeRequest(student_arch=arch, num_classes=source.num_classes,
                                    input_shape=tuple(source.input_shape), num_train=source.num_train,
                                    teacher=_frozen_copy(inputs), method=final.method if TEACHER in final.teachers else None,
                                    **_pruned_start(inputs, by_name[arch]))
            seed_everything(plan.seed)  # every candidate starts from the same seed
            scheme = build_scheme("offline", request)
            config = replace(final.train, epochs=epochs, seed=plan.seed, device=device, progress="off",
                             schedule="cosine", milestones=TrainConfig.milestones)
            try:
                result = fit(scheme, source, config, echo=None)
                score = result.best_record.get("val_top1")
            except NotLearning as err:  # a candidate that cannot learn under this recipe loses the round
                echo(f"probe: {arch} is out: {err.reason}")
                score = None
            scores[arch] = score if score is not None else -1.0
            rows.append({"name": arch, "round": round_number, "epochs": epochs, "score": score})
        field = sorted(field, key=lambda a: -scores[a])[:max(1, len(field) // 2)]
        epochs *= 2
        if len(field) == 1:
            break
    return field[0], rows


class ProbeView:
    """The data as a probe sees it: each epoch's shuffled training batches cut to a fraction, and
    no test split, so probing never touches the test data (the trainer skips an empty split)."""

    def __init__(self, source: Any, fraction: float) -> None:
        self._source, self._fraction = source, fraction

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def split_size(self, split: str) -> int:
        return 0 if split == "test" else self._source.split_size(split)

    def to(self, device: Any) -> "ProbeView":
        self._source.to(device)
        return self

    def loader(self, split: str, batch_size: int, **kwargs: Any):
        inner = self._source.loader(split, batch_size, **kwargs)
        return _Truncated(inner, math.ceil(len(inner) * self._fraction)) if split == "train" else inner


class _Truncated:
    def __init__(self, inner: Any, count: int) -> None:
        self._inner, self._count = inner, max(1, count)

    def __len__(self) -> int:
        return min(self._count, len(self._inner))

    def __iter__(self):
        for i, batch in enumerate(self._inner):
            if i >= self._count:
                break
            yield batch


def _frozen_copy(inputs: RunInputs):
    import copy

    return copy.deepcopy(inputs.teacher.model).eval()


def _pruned_start(inputs: Any, candidate: dict) -> dict:
    """The pruned-teacher candidate is probed from the teacher's kept weights, like its real stage."""
    if not candidate.get("pruned"):
        return {}
    from recipes.pruned import student_from_teacher

    return {"student_init": student_from_teacher(inputs.teacher.model, candidate["pruned"])}
