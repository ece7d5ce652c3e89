"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), the
embedded default that needs no files.

Pixels 0..16 are scaled to uint8 as ``round(v * 255 / 16)``; images are 1x8x8.

Splits (documented sizes, asserted by the tests; per-class shares by the largest-remainder rule
of :func:`compressor.data.splits.stratified_counts`, members picked at random):
  * test: a stratified hold-out of ``round_half_up(0.2 * 1797) = 359`` images with a FIXED seed,
    independent of ``seed``; the remaining 1438 form the training pool.
  * val: a stratified hold-out of ``round_half_up(val_fraction * 1438)`` images of the pool,
    seeded by ``seed``: 144 at the default 0.1, leaving 1294 for train (before corruptions).
Mean/std are computed over the whole training pool (train + val, before the seeded hold-out and
any corruption), so every seed and val_fraction shares one normalisation and a teacher and its
student see the same inputs. Augmentation: a random +-1 pixel shift (zero pad 1 + 8x8 crop), no
flip (a mirrored digit is another glyph).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from compressor.data.augment import CropFlip
from compressor.data.base import SplitOptions, check_nonempty, split_training_pool
from compressor.data.memory import InMemorySource
from compressor.data.order import TEST_STREAM
from compressor.data.spec import Protocol, register_source
from compressor.data.splits import channel_stats, stratified_holdout

TEST_FRACTION = 0.2
TEST_SEED = 0  # fixed: the test split never moves with the training seed
AUGMENTATION = CropFlip(pad=1, flip=False)
# The CPU-sized protocol: ResNet-110 reaches 97.5% test accuracy in 25 epochs (batch 32 gives 40 steps an
# epoch; the gradient norm is clipped at 1 because a 110-layer ResNet starts with gradient norms near 90,
# which otherwise stall the first epochs).
PROTOCOL = Protocol("digits", {
    "epochs": 25, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "schedule": "cosine", "grad_clip": 1.0,
})


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled ``digits.csv.gz`` (64 pixel columns, then the label), read directly:
    importing ``sklearn.datasets`` to call ``load_digits`` costs about 1.5 s of start-up for the
    same numbers. Falls back to ``load_digits`` if the file moved in another scikit-learn release."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        return np.loadtxt(path, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 (N, 1, 8, 8) and int64 labels, in scikit-learn's order."""
    table = _digits_table()
    images = torch.from_numpy(table[:, :64].reshape(-1, 8, 8)).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    return images.unsqueeze(1).contiguous(), torch.from_numpy(table[:, 64]).to(torch.int64)


@register_source("digits", needs_dir=False, summary="scikit-learn's bundled 8x8 digits, 10 classes", protocol=PROTOCOL,
                 rank=0)
def build_digits(directory: Path | None, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu") -> InMemorySource:
    images, labels = digits_arrays()
    pool, test = stratified_holdout(labels, TEST_FRACTION, TEST_SEED, stream=TEST_STREAM)
    split = split_training_pool(labels[pool], 10, options, hold_out_val=True)
    rows = {"train": pool[split.train_positions], "val": pool[split.val_positions], "test": test}
    check_nonempty({s: r.numel() for s, r in rows.items()}, options, pool.numel())
    mean, std = channel_stats(images[pool])
    return InMemorySource(
        spec=spec,
        name="digits",
        images=images,
        rows=rows,
        labels={"train": split.train_labels, "val": labels[rows["val"]], "test": labels[test]},
        class_names=[str(d) for d in range(10)],
        mean=mean,
        std=std,
        augmentation=AUGMENTATION,
        options=options,
        clean_train_labels=split.clean_train_labels,
        device=device,
    )
