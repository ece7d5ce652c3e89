"""``fashion-mnist[:DIR]`` / ``mnist:DIR``: the IDX files of Fashion-MNIST and MNIST, read here, never downloaded.

Files (each gzipped ``NAME.gz`` or raw ``NAME``; raw is read when both are there)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte   (60,000 training images)
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte    (10,000 test images)

Accepted layouts: flat ``DIR/<files>``; torchvision's ``DIR/FashionMNIST/raw/<files>`` and
``DIR/MNIST/raw/<files>``; DIR pointing straight at such a ``raw/`` folder. Without DIR,
``fashion-mnist`` reads the files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``; where ``dpkg -L`` says, if they moved). There is no
Debian package of MNIST's IDX files, so ``mnist`` needs DIR.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian 32-bit magic number
(0x00000803: unsigned bytes, 3 dimensions, for images; 0x00000801: 1 dimension, for labels), one
big-endian 32-bit size per dimension, then the bytes in row-major order. A file whose size does
not match its header is refused (truncated or with trailing bytes), as is any other magic number.

Held in memory as uint8 1x28x28, like digits and CIFAR. Splits: ``test`` is the t10k files; ``val``
is a stratified ``val_fraction`` hold-out of the 60,000 training images seeded by ``seed``; the rest,
after corruptions, is ``train``. The source option ``train_limit=N`` first keeps a stratified
subset of N training images, drawn with a FIXED seed so a teacher and its students at any seed
share it (a CPU-sized benchmark); val is then held out of those N. It is recorded in
``describe()['source_options']``.

Normalisation uses the standard published constants (not recomputed, so community checkpoints
match; a test checks them against the real Fashion-MNIST files): Fashion-MNIST mean 0.2860, std
0.3530; MNIST mean 0.1307, std 0.3081 (the PyTorch MNIST example's values).
Augmentation: 2-pixel zero pad + random 28x28 crop (a +-2 pixel shift), plus a horizontal flip for
Fashion-MNIST only: a mirrored shoe or shirt is still one, a mirrored digit is another glyph.
"""

from __future__ import annotations

import gzip
import math
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.data.augment import CropFlip
from compressor.data.base import SplitOptions
from compressor.data.memory import InMemorySource, pool_and_test_source
from compressor.data.spec import Protocol, register_source
from compressor.data.splits import stratified_subset
from compressor.errors import UserError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SIZE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IdxDataset:
    name: str
    folder: str  # torchvision's folder name: DIR/<folder>/raw/
    class_names: tuple[str, ...]
    mean: tuple[float]
    std: tuple[float]
    augmentation: CropFlip


FASHION_MNIST = IdxDataset(
    "fashion-mnist", "FashionMNIST",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    (0.2860,), (0.3530,), CropFlip(pad=2, flip=True),
)
MNIST = IdxDataset("mnist", "MNIST", tuple(str(d) for d in range(10)), (0.1307,), (0.3081,), CropFlip(pad=2, flip=False))


def _all_names() -> list[str]:
    return [name for pair in FILES.values() for name in pair]


def _find_file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_files(directory: Path, dataset: IdxDataset) -> dict[str, Path]:
    """The four files by name, from the first layout that holds them all; UserError naming what is missing."""
    roots = [directory, directory / dataset.folder / "raw", directory / "raw"]
    found: list[tuple[Path, dict[str, Path]]] = []
    for root in roots:
        files = {name: path for name in _all_names() if (path := _find_file(root, name)) is not None}
        if len(files) == len(FILES) * 2:
            return files
        found.append((root, files))
    root, files = max(found, key=lambda rf: len(rf[1]))  # the layout closest to complete explains best
    missing = [f"{n}[.gz]" for n in _all_names() if n not in files]
    only_test = files and all(n in FILES["test"] for n in files)
    hint = "; it holds only the test files (t10k-*), the training files are needed too" if only_test else ""
    raise UserError(
        f"{directory} is not a {dataset.name} directory: missing in {root}: {', '.join(missing)}{hint} "
        f"(expected the four IDX files flat in DIR, or in DIR/{dataset.folder}/raw/)"
    )


# the most an IDX file may hold here (EMNIST, the largest of the family, is about 0.6 GB)
MAX_IDX_BYTES = 4 << 30
_UNPLAUSIBLE_READ = 1 << 20  # of a .gz whose header is not IDX's: enough to tell a corrupt stream


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, a .gz decompressed, but never more than its IDX header accounts for plus
    one: a small .gz that inflates to gigabytes (a decompression bomb) is not read whole, and a
    header that claims more than MAX_IDX_BYTES is refused before anything is allocated."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            data, limit = fh.read(4), _UNPLAUSIBLE_READ
            if len(data) == 4 and data[:3] == b"\0\0\x08" and 1 <= data[3] <= 4:
                data += fh.read(4 * data[3])
                if len(data) == 4 + 4 * data[3]:
                    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
                    size = math.prod(dims)
                    if len(data) + size > MAX_IDX_BYTES:
                        raise UserError(f"{path}: its IDX header claims {' x '.join(map(str, dims))} values "
                                        f"({size} bytes), more than the {MAX_IDX_BYTES >> 30} GiB an IDX file may hold")
                    limit = size + 1
            return data + fh.read(limit)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is a corrupt .gz file ({err}); download or extract it again") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file as a uint8 array shaped as its header says; UserError if it is not that."""
    data = _read_bytes(path)
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise UserError(f"{path} is truncated: {len(data)} bytes, not even an IDX magic number")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(f"{path} has IDX magic number 0x{found:08X}, expected 0x{magic:08X} ({kind}); "
                        "is it the right file, and not a gzip file without .gz or an HTML error page?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    shape = f"({' x '.join(map(str, dims))} {kind})"
    if len(data) < expected:
        raise UserError(f"{path} is truncated: {len(data)} bytes where its header {shape} needs {expected}")
    if len(data) > expected:
        raise UserError(f"{path} is longer than its header says: its header {shape} needs {expected} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_split(files: dict[str, Path], split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 1 x 28 x 28 images, int64 labels) of ``train`` or ``test``."""
    image_name, label_name = FILES[split]
    images = read_idx(files[image_name], IMAGES_MAGIC)
    labels = read_idx(files[label_name], LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{files[image_name]} holds {images.shape[1]}x{images.shape[2]} images, expected "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{files[image_name]} holds {images.shape[0]} images but {files[label_name]} holds "
                        f"{labels.shape[0]} labels: the two files must be of the same split")
    if labels.size and labels.max() >= num_classes:
        raise UserError(f"{files[label_name]}: labels must lie in 0..{num_classes - 1}, found {labels.max()}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX file of a uint8 array (the inverse of :func:`read_idx`): for writing subsets and test files."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def debian_dir() -> Path | None:
    """Where ``dataset-fashion-mnist`` put its files: the packaged path, else what ``dpkg -L`` lists."""
    if _find_file(DEBIAN_DIR, FILES["train"][0]) is not None:
        return DEBIAN_DIR
    try:
        listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
        path = Path(line.strip())
        if path.name in (FILES["train"][0], f"{FILES['train'][0]}.gz") and path.is_file():
            return path.parent
    return None


def _check_train_limit(train_limit: int | None, pool: int, num_classes: int) -> None:
    if train_limit is None:
        return
    if isinstance(train_limit, bool) or not isinstance(train_limit, int) or not num_classes <= train_limit <= pool:
        raise UserError(f"train_limit {train_limit!r} is invalid: give a number of training images from "
                        f"{num_classes} (one per class) to {pool}")


def build_idx(dataset: IdxDataset, directory: Path, spec: str, options: SplitOptions, device: str | torch.device,
              train_limit: int | None = None) -> InMemorySource:
    files = find_files(directory, dataset)
    num_classes = len(dataset.class_names)
    train_x, train_y = read_split(files, "train", num_classes)
    test_x, test_y = read_split(files, "test", num_classes)
    _check_train_limit(train_limit, train_y.numel(), num_classes)
    if train_limit is not None:
        keep = stratified_subset(train_y, train_limit)
        train_x, train_y = train_x[keep], train_y[keep]
    return pool_and_test_source(spec=spec, name=dataset.name, pool=(train_x, train_y), test=(test_x, test_y),
                                class_names=list(dataset.class_names), mean=dataset.mean, std=dataset.std,
                                augmentation=dataset.augmentation, options=options, device=device,
                                source_options={} if train_limit is None else {"train_limit": train_limit})


# A CPU-sized protocol: batch 128, SGD momentum 0.9 with Nesterov, lr 0.05, cosine to 0 over 10 epochs,
# weight decay 5e-4, gradient norm clipped at 5: a guard, not a regulator (first epoch on 2,000 images,
# measured: ResNet-20's norm peaks at 4.5, the BatchNorm-free osakd_fmnist_cnn's at 7.0). One epoch of the
# 54,000 training images costs a ResNet-20 several minutes on one CPU thread; for a quick teacher use a
# subset (``load_source("fashion-mnist", train_limit=12000)``) or fewer epochs. On a GPU run the full
# protocol with ``--epochs 60`` (every other setting unchanged; the cosine stretches with it). MNIST trains
# the same way: same images and size; digits are easier, not different.
_IDX_SETTINGS = {
    "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "schedule": "cosine", "grad_clip": 5.0,
}


@register_source("fashion-mnist", needs_dir=False, accepts_dir=True,
                 summary="Fashion-MNIST IDX files (default: the Debian package dataset-fashion-mnist), 10 classes, 1x28x28",
                 protocol=Protocol("fashion-mnist", _IDX_SETTINGS), rank=20)
def build_fashion_mnist(directory: Path | None, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu",
                        train_limit: int | None = None) -> InMemorySource:
    if directory is None:
        directory = debian_dir()
        if directory is None:
            raise UserError(f"fashion-mnist without a directory reads the Debian package's files, which are not "
                            f"installed: run `apt-get install {DEBIAN_PACKAGE}`, or give fashion-mnist:DIR")
    return build_idx(FASHION_MNIST, directory, spec, options, device, train_limit)


@register_source("mnist", needs_dir=True, summary="MNIST IDX files (flat, or torchvision's DIR/MNIST/raw/), 10 classes, 1x28x28",
                 protocol=Protocol("mnist", dict(_IDX_SETTINGS)), rank=21)
def build_mnist(directory: Path, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu",
                train_limit: int | None = None) -> InMemorySource:
    return build_idx(MNIST, directory, spec, options, device, train_limit)
