"""Seeds: one integer fixes a run.

The trainer re-seeds every generator at the start of every epoch from ``(seed, epoch, rank)``.
With the data loader's order and augmentation already a pure function of (seed, epoch, rank,
world_size), everything random inside an epoch (dropout, a scheme's sampling) is then a function
of the same numbers, so a run resumed at an epoch boundary repeats the uninterrupted run exactly
without carrying generator states across (and that holds for any number of DDP processes).
"""

from __future__ import annotations

import hashlib
import random

import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch on every device."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device


def derive_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed from ``seed`` and e.g. (epoch, rank); stable across Python runs."""
    text = ":".join(str(int(v)) for v in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    seed_everything(derive_seed(seed, epoch, rank))


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """CUDA: deterministic kernels when asked (slower), else let cuDNN pick the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
