"""Training-set corruptions of the KD robustness study (Sarfraz, Arani & Zonooz, "Knowledge
Distillation Beyond Model Compression", ICPR 2020, Sec. "General-purpose training framework",
Tables V and VI). Both are seeded and never touch test. Class imbalance acts on the training
pool BEFORE the validation hold-out, so train and val together have the study's class sizes
(CIFAR-10: 5000 down to 250) and val is a stratified share of each class (see
:func:`compressor.data.base.split_training_pool`); label noise then acts on the train split only.

Source note: the copy of the paper in /work/shared/papers is the slide version, which names sigma
and gamma and their values but prints no formula; the definitions below follow the full paper
(arXiv:2007.01922) as we read it and could not be re-checked against its text here (a search of
the stored public pages found only its abstract: arxiv.org/abs/2007.01922v1, paperswithcode). What
the slides do fix is the CIFAR-10 range, 5000 down to 250 a class. Whatever the paper's exact
wording, the formulas below are what this code does, and the tests pin them.

Symmetric label noise at rate sigma (Table V: sigma in {0, 0.2, 0.4, 0.6}):
    exactly ``k = round_half_up(sigma * n)`` training samples, chosen uniformly without
    replacement, get a label drawn uniformly from the C - 1 OTHER classes (``y + U{1..C-1} mod C``).
    So the observed flip rate is exactly sigma (up to rounding to a whole sample). This is the
    "symmetric" (uniform off-diagonal) noise of the label-noise literature; the variant of Zhang et
    al. 2017 that redraws from all C classes would flip only sigma * (C-1)/C of the labels.

Class imbalance at ratio rho = n_max / n_min (``imbalance``, 1 = balanced) with one of two profiles
over the class index c = 0 .. C-1 (class 0 keeps the most samples). ``n_max`` is the smallest
per-class count in the training pool (train + val; 5000 for CIFAR-10), so every class can supply its
share; counts are floored (``floor(x + 1e-9)``) and at least 1 (the paper's rounding could not be
checked; the end points 5000 and 250 are exact either way, a middle class may differ by one):
  * default, exponential long tail (Cui et al. 2019, "Class-Balanced Loss", CIFAR-LT):
        n_c = floor(n_max * rho ** (-c / (C - 1)))
  * ``imbalance_gamma=gamma`` (the paper's gamma of Table VI, {0.2, 0.6, 1, 2}): the power-law
    model the paper adopts, n_c = a / (b + c**gamma), with a and b fixed by n_0 = n_max and
    n_{C-1} = n_max / rho, i.e.
        n_c = floor(n_max / (1 + (rho - 1) * (c / (C - 1)) ** gamma))
    Smaller gamma is harsher: most classes fall close to n_min (the paper's baseline accuracy
    rises with gamma). The paper's CIFAR-10 setting is n_max = 5000, n_min = 250: rho = 20, which
    gives these class sizes (train + val):
        gamma 0.2: 5000 377 331 307 291 279 269 262 255 250
        gamma 0.6: 5000 821 574 461 394 348 314 288 267 250
        gamma 1:   5000 1607 957 681 529 432 365 316 279 250
        gamma 2:   5000 4050 2579 1607 1051 728 529 400 312 250
The kept samples of class c are a seeded uniform random subset of size n_c.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compressor.data.order import IMBALANCE_STREAM, NOISE_STREAM, generator
from compressor.data.splits import round_half_up
from compressor.errors import UserError


def check_corruptions(label_noise: float, imbalance: float, imbalance_gamma: float | None) -> None:
    """Reject rates outside their domain before any data is read."""
    if not (isinstance(label_noise, (int, float)) and 0.0 <= label_noise < 1.0):
        raise UserError(f"label noise rate {label_noise!r} is outside [0, 1): give the fraction of training labels to corrupt, e.g. 0.2")
    if not (isinstance(imbalance, (int, float)) and math.isfinite(imbalance) and imbalance >= 1.0):
        raise UserError(f"imbalance {imbalance!r} is invalid: it is the ratio n_max/n_min of the largest to the smallest class, >= 1 (1 = balanced)")
    if imbalance_gamma is not None:
        if not (isinstance(imbalance_gamma, (int, float)) and math.isfinite(imbalance_gamma) and imbalance_gamma > 0):
            raise UserError(f"imbalance_gamma {imbalance_gamma!r} is invalid: the power-law exponent must be > 0 (the paper uses 0.2, 0.6, 1, 2)")
        if imbalance == 1.0:
            raise UserError("imbalance_gamma needs imbalance > 1 (the max/min class ratio; the paper's CIFAR-10 setting is 20 = 5000/250)")


PAPER_IMBALANCE_RATIO = 20.0  # KD benchmark (Sarfraz et al. 2021): 5000 -> 250 images per class


@dataclass(frozen=True)
class Corruption:
    """A run's training-set corruptions (``--label-noise``, ``--imbalance``, ``--imbalance-gamma``),
    checked once; plans and checkpoints record it so a teacher and its students can share it."""

    label_noise: float = 0.0
    imbalance: float = 1.0
    imbalance_gamma: float | None = None

    @classmethod
    def create(cls, label_noise: float | None = None, imbalance: float | None = None,
               imbalance_gamma: float | None = None) -> "Corruption":
        """From optional user values (None: not given); gamma without a ratio takes the paper's, 20."""
        noise = 0.0 if label_noise is None else label_noise
        ratio = (PAPER_IMBALANCE_RATIO if imbalance_gamma is not None else 1.0) if imbalance is None else imbalance
        check_corruptions(noise, ratio, imbalance_gamma)
        return cls(float(noise), float(ratio), None if imbalance_gamma is None else float(imbalance_gamma))

    @classmethod
    def from_dict(cls, record: dict[str, Any] | None) -> "Corruption":
        """From a plan's or a checkpoint's record (None or {}: clean); other keys are ignored."""
        record = record or {}
        if not isinstance(record, dict):
            raise UserError(f"corruption record {record!r} is not a mapping of label_noise, imbalance, imbalance_gamma")
        return cls.create(record.get("label_noise"), record.get("imbalance"), record.get("imbalance_gamma"))

    @property
    def clean(self) -> bool:
        return self.label_noise == 0.0 and self.imbalance == 1.0

    def to_dict(self) -> dict[str, Any]:
        """The record, and the keyword arguments of ``load_source``."""
        return asdict(self)

    def __str__(self) -> str:
        if self.clean:
            return "clean labels"
        parts = [f"label noise {self.label_noise:g}"] if self.label_noise else []
        if self.imbalance != 1.0:
            profile = "exponential" if self.imbalance_gamma is None else f"power law, gamma {self.imbalance_gamma:g}"
            parts.append(f"imbalance {self.imbalance:g} ({profile})")
        return ", ".join(parts)


def imbalance_counts(available: list[int], ratio: float, gamma: float | None = None) -> list[int]:
    """Per-class counts of the pool (train + val) after imbalance (see the module docstring)."""
    num_classes = len(available)
    if ratio == 1.0 or num_classes < 2:
        return list(available)
    n_max = min(available)
    counts = []
    for c in range(num_classes):
        t = c / (num_classes - 1)
        share = ratio ** (-t) if gamma is None else 1.0 / (1.0 + (ratio - 1.0) * t**gamma)
        counts.append(max(1, int(math.floor(n_max * share + 1e-9))))
    return counts


def apply_imbalance(labels: torch.Tensor, num_classes: int, ratio: float, gamma: float | None, seed: int) -> torch.Tensor:
    """Sorted positions of the pool's samples (train + val, before the hold-out) kept under the profile."""
    available = [int((labels == c).sum()) for c in range(num_classes)]
    if ratio == 1.0:
        return torch.arange(labels.numel())
    missing = [c for c, n in enumerate(available) if n == 0]
    if missing:
        raise UserError(f"cannot impose class imbalance: classes {missing[:5]} have no training samples")
    targets = imbalance_counts(available, ratio, gamma)
    gen = generator(IMBALANCE_STREAM, seed)
    kept = []
    for c, n_c in enumerate(targets):
        members = torch.nonzero(labels == c).flatten()
        kept.append(members[torch.randperm(members.numel(), generator=gen)[:n_c]])
    return torch.sort(torch.cat(kept)).values


def apply_label_noise(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> torch.Tensor:
    """A copy of ``labels`` with ``round_half_up(rate * n)`` of them moved to a different class."""
    noisy = labels.clone()
    k = round_half_up(rate * labels.numel())
    if k == 0:
        return noisy
    if num_classes < 2:
        raise UserError("label noise needs at least 2 classes")
    gen = generator(NOISE_STREAM, seed)
    picked = torch.randperm(labels.numel(), generator=gen)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=gen)
    noisy[picked] = (labels[picked] + shift) % num_classes
    return noisy
