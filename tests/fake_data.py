"""Tiny synthetic datasets in the REAL on-disk formats, for tests (CIFAR pickles, image folders).

Images encode their label: every pixel of an image of class ``c`` has value ``label_value(c)``
(optionally with a per-image id in channel 0's first pixel), so tests can check label alignment
after shuffling and augmentation.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as the real CIFAR files were
    made: loaded with ``encoding='latin1'`` (torchvision) the keys are ``str``, with
    ``encoding='bytes'`` they are ``bytes``; numpy arrays carry their buffer the same way."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((b"U" + bytes([n]) if n < 256 else b"T" + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # Python 2 era module path


def label_value(c: int) -> int:
    """The pixel value that marks class ``c`` (distinct for c < 25, never 0 = the padding value)."""
    return 10 + 10 * (c % 25)


def _images(labels: np.ndarray, size: int, rng: np.random.Generator, encode: bool) -> np.ndarray:
    if encode:
        data = np.empty((len(labels), 3, size, size), dtype=np.uint8)
        data[:] = np.array([label_value(int(c)) for c in labels], dtype=np.uint8)[:, None, None, None]
        return data
    return rng.integers(0, 256, size=(len(labels), 3, size, size), dtype=np.uint8)


def write_cifar(root: Path, *, kind: str = "cifar10", per_class_train: int = 3, per_class_test: int = 1,
                num_classes: int | None = None, encode_labels: bool = True, seed: int = 0, nested: bool = True,
                protocol: int | None = None) -> Path:
    """Write a CIFAR-10/100 directory torchvision could read; returns the spec directory.

    ``protocol=None`` writes Python-2-style pickles like the published files; an int writes a
    Python 3 pickle of that protocol (bytes keys stay bytes).
    ``num_classes`` < the real count only labels that many classes (the meta still lists all).
    """
    rng = np.random.default_rng(seed)
    full = 10 if kind == "cifar10" else 100
    used = num_classes or full
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python") if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"

    def dump(name: str, labels: np.ndarray) -> None:
        data = _images(labels, 32, rng, encode_labels).reshape(len(labels), -1)
        batch = {b"batch_label": name.encode(), label_key: [int(v) for v in labels], b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
        if kind == "cifar100":
            batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
        save(folder / name, batch)

    def save(path: Path, obj: dict) -> None:
        path.write_bytes(py2_pickle(obj) if protocol is None else pickle.dumps(obj, protocol=protocol))

    train_labels = rng.permutation(np.repeat(np.arange(used), per_class_train))
    test_labels = np.repeat(np.arange(used), per_class_test)
    if kind == "cifar10":
        chunks = np.array_split(train_labels, 5)
        for i, chunk in enumerate(chunks, start=1):
            dump(f"data_batch_{i}", chunk)
        dump("test_batch", test_labels)
        meta = {b"label_names": [f"class{c}".encode() for c in range(full)], b"num_cases_per_batch": len(chunks[0])}
        meta_name = "batches.meta"
    else:
        dump("train", train_labels)
        dump("test", test_labels)
        meta = {b"fine_label_names": [f"fine{c}".encode() for c in range(full)],
                b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]}
        meta_name = "meta"
    save(folder / meta_name, meta)
    return root


def write_imagefolder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: dict[str, int] | None = None,
                      size: tuple[int, int] = (12, 12), encode_labels: bool = True, seed: int = 0) -> Path:
    """DIR/<split>/<class>/<i>.png for the splits in ``per_class`` (default train: 6, val: 2)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "val": 2}
    for split, count in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if encode_labels:
                    pixels = np.full((size[1], size[0], 3), label_value(c), dtype=np.uint8)
                else:
                    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file as LeCun documents it: 0x0000 0x08 (unsigned byte) ndim, big-endian sizes, data."""
    from compressor.data.idx import encode_idx

    return encode_idx(array)


def write_idx(root: Path, *, per_class_train: int = 3, per_class_test: int = 1, num_classes: int = 10,
              gz: bool = True, layout: str = "flat", splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Write MNIST-style IDX files whose 28x28 images are filled with ``label_value(label)`` (pixel
    (0, 0) = the image's index within its file, mod 256); labels cycle 0..num_classes-1.

    ``layout``: ``flat`` (root/<files>), ``FashionMNIST`` or ``MNIST`` (torchvision's
    root/<layout>/raw/<files>). Returns the folder holding the files.
    """
    import gzip

    folder = root if layout == "flat" else root / layout / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        per_class = per_class_train if split == "train" else per_class_test
        labels = np.tile(np.arange(num_classes, dtype=np.uint8), per_class)
        images = np.empty((labels.size, 28, 28), dtype=np.uint8)
        images[:] = np.array([label_value(int(c)) for c in labels], dtype=np.uint8)[:, None, None]
        images[:, 0, 0] = np.arange(labels.size) % 256
        for name, array in zip(IDX_NAMES[split], (images, labels)):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes: to show that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(text: str) -> str:
    """The only non-empty line of ``text`` (a user error), asserting there is one and no traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def digits_meta():
    """The ModelMeta of a resnet8 for digits-shaped data (1x8x8, 10 classes)."""
    from compressor.checkpoint import ModelMeta

    return ModelMeta(arch="resnet8", num_classes=10, in_chans=1, input_size=(8, 8), mean=(0.5,), std=(0.25,),
                     dataset="digits", class_names=[str(i) for i in range(10)])


def write_digits_checkpoint(path: Path) -> Path:
    """A seeded, untrained resnet8 checkpoint for digits-shaped data (1x8x8, 10 classes)."""
    import torch

    from compressor.checkpoint import save_model
    from compressor.models import create

    torch.manual_seed(0)
    save_model(path, create("resnet8", num_classes=10, in_chans=1), digits_meta())
    return path
