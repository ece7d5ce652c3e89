"""The DataSource contract every spec resolves to, and the split logic shared by all sources.

A source owns three splits: ``train`` (after the corruptions and the validation hold-out),
``val`` (held out for every choice made during training; under class imbalance, a stratified share
of the imbalanced pool) and ``test`` (touched once, at the end).
Its loaders yield :class:`compressor.batch.Batch` with ``x`` normalised on the source's device,
``y`` int64 and ``index`` = the sample's position within its split (stable across epochs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Protocol

import torch

from compressor.batch import Batch
from compressor.data.corruptions import apply_imbalance, apply_label_noise
from compressor.data.splits import stratified_holdout
from compressor.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitOptions:
    """How the training data was split and corrupted: recorded with every source."""

    val_fraction: float = 0.1
    seed: int = 0
    label_noise: float = 0.0
    imbalance: float = 1.0
    imbalance_gamma: float | None = None


class BatchLoader(Protocol):
    """What ``DataSource.loader`` returns: re-iterable, sized, yields Batch."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size {batch_size!r} is invalid: give a positive integer")


@dataclass
class TrainSplit:
    """Result of :func:`split_training_pool`: positions into the training pool."""

    train_positions: torch.Tensor  # int64, sorted
    train_labels: torch.Tensor  # int64, possibly noisy, aligned with train_positions
    clean_train_labels: torch.Tensor  # the labels before noise, for analysis
    val_positions: torch.Tensor  # int64, sorted; empty when val comes from elsewhere


def split_training_pool(
    pool_labels: torch.Tensor, num_classes: int, options: SplitOptions, *, hold_out_val: bool
) -> TrainSplit:
    """Imbalance the whole pool, then hold out val (stratified, seeded by ``options.seed``) from what
    is kept, then label noise on the training part only.

    Imbalance acts on train and val TOGETHER, so the class sizes are the robustness study's (CIFAR-10:
    5000 down to 250 images a class, train + val) and val is a stratified ``val_fraction`` of each
    class's kept images (500 of 5000, 25 of 250): an imbalanced val, the same proportions as train.
    A balanced pool is split exactly as before. Label noise never reaches val or test.
    """
    kept = apply_imbalance(pool_labels, num_classes, options.imbalance, options.imbalance_gamma, options.seed)
    if hold_out_val:
        train_rel, val_rel = stratified_holdout(pool_labels[kept], options.val_fraction, options.seed)
        train_pos, val_pos = kept[train_rel], kept[val_rel]
    else:
        train_pos, val_pos = kept, torch.zeros(0, dtype=torch.int64)
    clean = pool_labels[train_pos]
    noisy = apply_label_noise(clean, num_classes, options.label_noise, options.seed)
    return TrainSplit(train_pos, noisy, clean, val_pos)


def check_nonempty(sizes: dict[str, int], options: SplitOptions, pool_size: int) -> None:
    """A split with no samples is a user mistake (e.g. val_fraction too small or too big)."""
    for split, size in sizes.items():
        if size == 0:
            hint = (
                f"val_fraction={options.val_fraction} of {pool_size} training samples holds out nothing; raise val_fraction"
                if split == "val"
                else f"val_fraction={options.val_fraction} leaves no training samples; lower it"
                if split == "train"
                else "the test data has no samples"
            )
            raise UserError(f"the {split} split would be empty: {hint}")


class DataSource(ABC):
    """A dataset with train/val/test splits, normalisation and deterministic loaders."""

    spec: str
    name: str  # 'digits' | 'cifar10' | 'cifar100' | 'imagefolder'
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: SplitOptions
    device: torch.device

    def __init__(self) -> None:
        self._norm_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.source_options: dict[str, Any] = {}  # what the source was opened with beyond the spec (e.g. train_limit)

    # --- sizes and labels -------------------------------------------------------------------
    @abstractmethod
    def split_size(self, split: str) -> int:
        """Number of samples in ``split`` (train: after the hold-out and corruptions)."""

    @abstractmethod
    def targets(self, split: str) -> torch.Tensor:
        """int64 CPU labels of ``split`` in position order (train: the possibly noisy labels trained on)."""

    @property
    def num_train(self) -> int:
        return self.split_size("train")

    def class_counts(self, split: str) -> list[int]:
        """Samples per class in ``split`` (with the labels the loader yields)."""
        return torch.bincount(self.targets(split), minlength=self.num_classes).tolist()

    # --- loading ----------------------------------------------------------------------------
    @abstractmethod
    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        drop_last: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> BatchLoader:
        """Batches of ``split``; order and augmentation are a pure function of (seed, epoch, rank, world_size)."""

    @abstractmethod
    def sample(self, split: str, n: int, seed: int = 0) -> Batch:
        """``n`` (or all, if fewer) seeded-random samples of ``split``, normalised, never augmented:
        for int8 calibration, parity checks and probes."""

    @abstractmethod
    def to(self, device: str | torch.device) -> "DataSource":
        """Move (in place) to ``device``; returns self."""

    # --- normalisation ----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 ``(x/255 - mean) / std`` on the images' device."""
        key = str(images.device)
        if key not in self._norm_cache:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            self._norm_cache[key] = (mean, std)
        mean, std = self._norm_cache[key]
        return (images.to(torch.float32) / 255.0 - mean) / std

    # --- what a checkpoint records ----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Plain (JSON/YAML/weights_only-safe) record: lists, not tuples; ``options`` is informational."""
        return {
            "spec": self.spec,
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "options": asdict(self.options),
            "source_options": dict(self.source_options),
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.split_size(s)}" for s in SPLITS)
        return f"{type(self).__name__}({self.spec!r}, classes={self.num_classes}, shape={self.input_shape}, {sizes})"

