"""Sources that fit in memory (digits, CIFAR): ONE uint8 tensor on the training device.

All splits index into the same ``images`` tensor through per-split row tensors, so moving the
source to a GPU moves the data once; each batch is gathered, augmented (:mod:`.augment`) and
normalised there, with no worker processes and no per-image Python.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from compressor.batch import Batch
from compressor.data.augment import CropFlip, crop_flip
from compressor.data.base import DataSource, SplitOptions, check_batch_size, check_nonempty, check_split, split_training_pool
from compressor.data.order import AUGMENT_STREAM, SAMPLE_STREAM, augment_draws, epoch_order, generator, num_batches


class InMemorySource(DataSource):
    def __init__(
        self,
        *,
        spec: str,
        name: str,
        images: torch.Tensor,
        rows: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        class_names: list[str],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: CropFlip,
        options: SplitOptions,
        clean_train_labels: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        source_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.source_options = dict(source_options or {})
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 (N, C, H, W) tensor")
        self.spec, self.name = spec, name
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.input_shape = tuple(int(v) for v in images.shape[1:])  # type: ignore[assignment]
        self.mean, self.std = tuple(mean), tuple(std)
        self.options = options
        self.augmentation = augmentation
        self.device = torch.device("cpu")
        self.images = images.contiguous()
        self.rows = {s: r.to(torch.int64) for s, r in rows.items()}
        self.labels = {s: y.to(torch.int64) for s, y in labels.items()}
        self.clean_train_labels = (clean_train_labels if clean_train_labels is not None else self.labels["train"]).cpu()
        self.to(device)

    def to(self, device: str | torch.device) -> "InMemorySource":
        device = torch.device(device)
        self.images = self.images.to(device)
        self.rows = {s: r.to(device) for s, r in self.rows.items()}
        self.labels = {s: y.to(device) for s, y in self.labels.items()}
        self.device = device
        return self

    def split_size(self, split: str) -> int:
        return int(self.rows[check_split(split)].numel())

    def targets(self, split: str) -> torch.Tensor:
        return self.labels[check_split(split)].cpu()

    def batch_at(self, split: str, positions: torch.Tensor, aug_params: torch.Tensor | None = None) -> Batch:
        """The Batch of ``split`` samples at ``positions`` (optionally augmented with ``aug_params``)."""
        positions = positions.to(self.device)
        images = self.images.index_select(0, self.rows[split].index_select(0, positions))
        if aug_params is not None:
            images = crop_flip(images, aug_params, self.augmentation.pad)
        return Batch(self.normalize(images), self.labels[split].index_select(0, positions), positions)

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
    ) -> "MemoryLoader":
        check_split(split)
        check_batch_size(batch_size)
        return MemoryLoader(self, split, batch_size, shuffle, augment, drop_last, seed, epoch, rank, world_size)

    def sample(self, split: str, n: int, seed: int = 0) -> Batch:
        size = self.split_size(split)
        positions = torch.randperm(size, generator=generator(SAMPLE_STREAM, seed))[: max(0, int(n))]
        return self.batch_at(split, positions)


class MemoryLoader:
    """One epoch of one rank's batches; iterating again replays exactly the same batches."""

    def __init__(self, source: InMemorySource, split: str, batch_size: int, shuffle: bool, augment: bool,
                 drop_last: bool, seed: int, epoch: int, rank: int, world_size: int) -> None:
        self.source, self.split, self.batch_size = source, split, batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.order = epoch_order(source.split_size(split), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return num_batches(self.order.numel(), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        params = None
        if self.augment:
            gen = generator(AUGMENT_STREAM, self.seed, self.epoch, 0, 1)  # one process's draws, on every rank
            params = augment_draws(self.source.split_size(self.split), self.rank, self.world_size,
                                   lambda n: self.source.augmentation.draw_params(n, gen))
        for b in range(len(self)):
            lo, hi = b * self.batch_size, (b + 1) * self.batch_size
            yield self.source.batch_at(self.split, self.order[lo:hi], None if params is None else params[lo:hi])


def pool_and_test_source(
    *,
    spec: str,
    name: str,
    pool: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    class_names: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augmentation: CropFlip,
    options: SplitOptions,
    device: str | torch.device = "cpu",
    source_options: dict | None = None,
) -> InMemorySource:
    """A source from a training pool and a separate test set (CIFAR, Fashion-MNIST, MNIST): val is
    the seeded stratified hold-out of the pool, train the rest after the corruptions."""
    (train_x, train_y), (test_x, test_y) = pool, test
    split = split_training_pool(train_y, len(class_names), options, hold_out_val=True)
    n_pool = train_x.shape[0]
    rows = {
        "train": split.train_positions,
        "val": split.val_positions,
        "test": torch.arange(n_pool, n_pool + test_x.shape[0]),
    }
    check_nonempty({s: r.numel() for s, r in rows.items()}, options, n_pool)
    extra = {} if source_options is None else {"source_options": source_options}
    return InMemorySource(
        spec=spec, name=name, images=torch.cat([train_x, test_x]), rows=rows,
        labels={"train": split.train_labels, "val": train_y[split.val_positions], "test": test_y},
        class_names=list(class_names), mean=mean, std=std, augmentation=augmentation, options=options,
        clean_train_labels=split.clean_train_labels, device=device, **extra,
    )
