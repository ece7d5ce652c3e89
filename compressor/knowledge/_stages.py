"""Shared rules for pairing student and teacher stages that differ in count and spatial size.

Feature losses compare maps of two networks that may come from different families (ResNet ->
ShuffleNet, VGG -> MobileNet): different stage counts, channels and resolutions. Every loss in
this package uses the same two rules so that "which stage meets which" is decided in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def match_by_depth(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pairs ``(student_index, teacher_index)`` of stages at the same relative depth.

    Equal counts pair stage i with stage i (RepDistiller's rule). Otherwise every stage of the
    shorter list is paired with the stage of the longer list at the same relative depth,
    ``round(i * (n_long - 1) / (n_short - 1))``, so the shallowest meet the shallowest and the
    deepest meet the deepest; a single stage meets the deepest one.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError("both models need at least one stage to pair")
    n_short, n_long = sorted((n_student, n_teacher))
    if n_short == 1:
        picks = [n_long - 1]
    else:
        picks = [round(i * (n_long - 1) / (n_short - 1)) for i in range(n_short)]
    if n_student <= n_teacher:
        return list(enumerate(picks))
    return [(p, i) for i, p in enumerate(picks)]


def depth_index(index: int, n_from: int, n_to: int) -> int:
    """The stage of an ``n_to``-stage model at the relative depth of stage ``index`` of ``n_from``."""
    if n_from == n_to:
        return index
    if n_from == 1:
        return n_to - 1
    return round(index * (n_to - 1) / (n_from - 1))


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive average pooling to ``size``; a no-op when the map already has it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)


def smaller_size(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Per axis, the smaller of two spatial sizes: the common grid both maps are pooled to."""
    return (min(a[0], b[0]), min(a[1], b[1]))


def pool_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two maps to the smaller one's spatial size."""
    size = smaller_size(tuple(a.shape[-2:]), tuple(b.shape[-2:]))
    return pool_to(a, size), pool_to(b, size)


def full_precision(x: Tensor) -> torch.autocast:
    """Autocast switched off on ``x``'s device: Gram-like sums overflow half precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)
