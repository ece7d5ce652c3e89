"""How much distillation helped: KD gain and Average Relative Improvement (ARI).

Both compare accuracies measured on the same split with the same schedule and seeds; they are
plain arithmetic on numbers the trainer already reports, so reports and benchmarks share them.
Accuracies may be fractions or percentages, as long as one call uses one scale.
"""

from __future__ import annotations

from typing import Sequence


def kd_gain(acc_distilled: float, acc_vanilla: float) -> float:
    """``KD_Gain = ACC_KD - ACC_Vanilla`` (attention-cohort paper, Eq. 11).

    The accuracy of the distilled student minus that of the same architecture trained alone
    with the same epochs and seeds; positive means distillation helped. Same unit as the inputs.
    """
    return float(acc_distilled) - float(acc_vanilla)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (the mean of seeds in a comparison table)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def average_relative_improvement(
    acc_new: Sequence[float], acc_method: Sequence[float], acc_vanilla: Sequence[float]
) -> float:
    """Average Relative Improvement of a new method over a reference method, in percent.

    ModReduce (Sec. 5), after CRD (Tian et al., 2020) and SemCKD (Chen et al., 2021):

        ARI = 1/M * sum_i (Acc_i^new - Acc_i^method) / (Acc_i^method - Acc_i^vanilla) * 100%

    over M teacher/student pairs ``i``: how much of the reference method's own gain over the
    vanilla student the new method adds on top (100% = it doubles the gain, negative = it loses
    some). A pair where the reference method gained nothing over vanilla has no relative scale,
    so it is refused rather than producing an infinite average. The metric presumes the reference
    method beats vanilla: where it does not (a negative denominator) a pair's sign is inverted,
    so read such pairs with :func:`kd_gain` beside them.
    """
    new, ref, base = list(acc_new), list(acc_method), list(acc_vanilla)
    if not (len(new) == len(ref) == len(base)):
        raise ValueError(f"ARI needs one accuracy per pair in each list, got {len(new)}, {len(ref)}, {len(base)}")
    if not new:
        raise ValueError("ARI needs at least one teacher/student pair")
    ratios = []
    for i, (a_new, a_ref, a_base) in enumerate(zip(new, ref, base)):
        gain = float(a_ref) - float(a_base)
        if gain == 0:
            raise ValueError(f"ARI is undefined for pair {i}: the reference method equals the vanilla student")
        ratios.append((float(a_new) - float(a_ref)) / gain)
    return 100.0 * sum(ratios) / len(ratios)
