"""``cifar10:DIR`` / ``cifar100:DIR``: torchvision's on-disk python format, read here, never downloaded.

Accepted layouts (DIR may also point straight at the extracted folder):
    DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    DIR/cifar-100-python/{train, test, meta}
Each batch is a pickled dict with ``data`` (N x 3072 uint8 rows, channel-major 3x32x32) and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the meta file names the classes
(``label_names`` / ``fine_label_names``). Keys may be ``bytes`` or ``str`` (Python 2 or 3 pickles).
Pickles are read with an unpickler that only admits numpy arrays and builtins, so a tampered file
cannot run code.

Splits: ``test`` is the test batch; ``val`` is a stratified ``val_fraction`` hold-out of the
training batches seeded by ``seed``; the rest, after corruptions, is ``train``. Normalisation uses
the standard published constants (not recomputed), so checkpoints from the community match.
Augmentation: 4-pixel zero pad + random 32x32 crop + horizontal flip, batched on the device.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.data.augment import CropFlip
from compressor.data.base import SplitOptions
from compressor.data.memory import InMemorySource, pool_and_test_source
from compressor.data.spec import Protocol, register_source
from compressor.errors import UserError

AUGMENTATION = CropFlip(pad=4, flip=True)


@dataclass(frozen=True)
class CifarLayout:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    "batches.meta", "labels", "label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100,
    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admit only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _key(k: Any) -> Any:
    return k.decode("latin1") if isinstance(k, bytes) else k


def read_batch(path: Path) -> dict[str, Any]:
    """One pickled CIFAR file as a dict with ``str`` keys; UserError if it is not one."""
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise UserError(f"{path} is not a CIFAR python batch ({err}); expected torchvision's on-disk pickles") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR python batch: expected a pickled dict, found {type(obj).__name__}")
    return {_key(k): v for k, v in obj.items()}


def find_root(directory: Path, layout: CifarLayout) -> Path:
    """DIR/<folder> or DIR itself, whichever holds the files; UserError naming what is missing."""
    needed = (*layout.train_files, layout.test_file, layout.meta_file)
    for root in (directory / layout.folder, directory):
        if all((root / f).is_file() for f in needed):
            return root
    root = directory / layout.folder if (directory / layout.folder).is_dir() else directory
    missing = [f for f in needed if not (root / f).is_file()]
    raise UserError(
        f"{directory} is not a {layout.name} directory: expected {layout.folder}/ with {', '.join(needed)} "
        f"(torchvision's python format); missing in {root}: {', '.join(missing)}"
    )


def _images_labels(batch: dict[str, Any], layout: CifarLayout, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if "data" not in batch or layout.label_key not in batch:
        raise UserError(f"{path} lacks the '{layout.label_key}' or 'data' entry of a {layout.name} batch (found keys: {sorted(map(str, batch))})")
    data = np.asarray(batch["data"])
    raw_labels = np.asarray(batch[layout.label_key])
    if raw_labels.ndim != 1 or (raw_labels.size and raw_labels.dtype.kind not in "iu"):
        raise UserError(f"{path}: '{layout.label_key}' labels must be integers 0..{layout.num_classes - 1}, found "
                        f"{raw_labels.dtype} values such as {raw_labels.ravel()[:1].tolist()}")
    labels = raw_labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise UserError(f"{path}: 'data' must be N x 3072 uint8 rows matching {labels.shape[0]} labels, found {data.dtype} {data.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise UserError(f"{path}: labels must lie in 0..{layout.num_classes - 1}, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def read_cifar(directory: Path, layout: CifarLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(train images, train labels, test images, test labels, class names) from disk."""
    root = find_root(directory, layout)
    parts = [_images_labels(read_batch(root / f), layout, root / f) for f in layout.train_files]
    test_x, test_y = _images_labels(read_batch(root / layout.test_file), layout, root / layout.test_file)
    meta = read_batch(root / layout.meta_file)
    names = meta.get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        raise UserError(f"{root / layout.meta_file} must list {layout.num_classes} '{layout.names_key}'")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    return train_x, train_y, test_x, test_y, class_names


# The CRD/SemCKD benchmark protocol (Tian et al. 2020): SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2 and
# ShuffleNet students), 240 epochs, lr x0.1 at 150/180/210, batch 64, weight decay 5e-4.
PROTOCOL = Protocol("cifar", {
    "epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
    "weight_decay": 5e-4, "schedule": "step", "milestones": [150, 180, 210], "gamma": 0.1,
}, low_lr=0.01)


def build_cifar(layout: CifarLayout, directory: Path, spec: str, options: SplitOptions, device: str | torch.device) -> InMemorySource:
    train_x, train_y, test_x, test_y, class_names = read_cifar(directory, layout)
    return pool_and_test_source(spec=spec, name=layout.name, pool=(train_x, train_y), test=(test_x, test_y),
                                class_names=class_names, mean=layout.mean, std=layout.std,
                                augmentation=AUGMENTATION, options=options, device=device)


@register_source("cifar10", needs_dir=True, summary="CIFAR-10 in torchvision's python format, 10 classes, 3x32x32",
                 protocol=PROTOCOL, rank=10)
def build_cifar10(directory: Path, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu") -> InMemorySource:
    return build_cifar(CIFAR10, directory, spec, options, device)


@register_source("cifar100", needs_dir=True, summary="CIFAR-100 in torchvision's python format, 100 fine classes, 3x32x32",
                 protocol=PROTOCOL, rank=11)
def build_cifar100(directory: Path, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu") -> InMemorySource:
    return build_cifar(CIFAR100, directory, spec, options, device)
