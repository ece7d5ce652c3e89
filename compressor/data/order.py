"""Which samples a rank sees in an epoch, and in what order: a pure function of its arguments.

The trainer's exact resume depends on this: re-running epoch ``e`` after a restart must give the
same batches, so every random draw here comes from a local ``torch.Generator`` seeded from
``(seed, epoch, ...)`` and never from the global RNG.

Sharding follows ``torch.utils.data.DistributedSampler`` (``drop_last=False``): every rank draws
the SAME permutation (it depends on ``(seed, epoch)`` only), the permutation is padded by repeating
its head until its length divides by ``world_size``, and rank ``r`` takes positions
``r, r + world_size, r + 2*world_size, ...``. So shards are disjoint apart from the padding
repeats, and all ranks get ``ceil(n / world_size)`` samples (equal lengths keep DDP in step).
Augmentation is drawn per position of the permutation, as one process draws it, and each rank
takes its positions' draws (:func:`augment_draws`): at every step the ranks' batches together
are the single process's batch, crops and flips included.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from compressor.errors import UserError

# Tags that keep the streams of different purposes apart for the same (seed, epoch).
ORDER_STREAM = 1
AUGMENT_STREAM = 2
SPLIT_STREAM = 3
NOISE_STREAM = 4
IMBALANCE_STREAM = 5
SAMPLE_STREAM = 6
TEST_STREAM = 7
SUBSET_STREAM = 8


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hash): nearby inputs give
    unrelated streams, unlike ``seed + epoch``."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [len(parts)]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts``; draws are moved to the device afterwards, so the
    same seed gives the same order and augmentation on CPU and on CUDA."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(*parts))
    return gen


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} / world_size {world_size} is invalid: need world_size >= 1 and 0 <= rank < world_size")


def shard_length(n: int, world_size: int) -> int:
    """Samples each rank gets per epoch (padding included)."""
    return math.ceil(n / world_size) if n else 0


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Split positions (int64, CPU) that ``rank`` visits in ``epoch``, in visiting order."""
    check_rank(rank, world_size)
    if shuffle:
        order = torch.randperm(n, generator=generator(ORDER_STREAM, seed, epoch))
    else:
        order = torch.arange(n, dtype=torch.int64)
    if world_size == 1 or n == 0:
        return order
    return order[shard_positions(n, rank, world_size)]


def shard_positions(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions in an epoch's permutation of ``n`` that ``rank`` visits, in order: ``rank``,
    ``rank + world_size``, ... of the permutation padded by repeating its head (int64, CPU)."""
    check_rank(rank, world_size)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(rank, shard_length(n, world_size) * world_size, world_size, dtype=torch.int64) % n


def augment_draws(n: int, rank: int, world_size: int, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """This rank's rows of the per-position augmentation draws of an epoch: ``draw(n)`` makes one row
    per position of the permutation, the same for every world size (a single process's draws), and
    each rank takes the rows of its positions. So a sample is augmented alike whether one process
    or several train: two ranks together see exactly the global batches one process sees."""
    rows = draw(n)
    return rows if world_size == 1 else rows[shard_positions(n, rank, world_size)]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
