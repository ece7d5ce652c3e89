"""Stratified hold-out and normalisation statistics shared by every source."""

from __future__ import annotations

import math

import torch

from compressor.data.order import SPLIT_STREAM, SUBSET_STREAM, generator


def round_half_up(x: float) -> int:
    """Rounding that does not depend on Python's banker's rounding (documented split sizes)."""
    return int(math.floor(x + 0.5))


def stratified_counts(class_sizes: list[int], fraction: float) -> list[int]:
    """How many samples of each class to hold out: ``k = round_half_up(fraction * n)`` in total,
    shared out by the largest-remainder method (``floor(fraction * n_c)`` each, then one more to
    the classes with the largest fractional parts, ties to the lower class index). Exact total,
    proportional per class, and never a whole class since ``fraction < 1``."""
    total = round_half_up(fraction * sum(class_sizes))
    exact = [fraction * n for n in class_sizes]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(class_sizes)), key=lambda c: (-(exact[c] - counts[c]), c))
    for c in order[: max(0, total - sum(counts))]:
        counts[c] += 1
    return counts


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int, stream: int = SPLIT_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions ``0..len(labels)-1`` into (kept, held_out), both sorted ascending.

    Per-class sizes come from :func:`stratified_counts` over the classes present (ascending); the
    held-out members of each class are a seeded uniform random subset (one generator, classes in
    ascending order), so both parts keep the class proportions.
    """
    gen = generator(stream, seed)
    classes = torch.unique(labels).tolist()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    counts = stratified_counts([m.numel() for m in members], fraction)
    held = [m[torch.randperm(m.numel(), generator=gen)[:k]] for m, k in zip(members, counts)]
    held_out = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


SUBSET_SEED = 0  # fixed: every run (any --seed) that asks for the same subset gets the same images


def stratified_subset(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Sorted positions of a stratified random ``size``-sample subset of ``labels``, drawn with a
    FIXED seed so a teacher and its students, at any seed, share it (exact total, per-class shares
    by :func:`stratified_counts`)."""
    n = labels.numel()
    if size >= n:
        return torch.arange(n)
    return stratified_holdout(labels, size / n, SUBSET_SEED, stream=SUBSET_STREAM)[1]


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) scaled to [0, 1]."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3)).cpu()
        total_sq += block.pow(2).sum(dim=(0, 2, 3)).cpu()
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
