"""``imagefolder:DIR``: a folder of image files per class, read by a torch DataLoader with workers.

Layout: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` are required, ``DIR/test/<class>/*`` is
optional. Classes are the sorted sub-folder names of ``train/``; ``val/`` and ``test/`` may hold a
subset of them. Files with the usual image extensions are read and converted to RGB (C = 3).

Splits:
  * with ``DIR/test``: train = DIR/train (all of it, then corruptions), val = DIR/val,
    test = DIR/test; ``val_fraction`` is not used.
  * without it (the common ImageNet-style layout, whose val/ is the de-facto test set):
    test = DIR/val, and our val is a stratified ``val_fraction`` hold-out of DIR/train seeded
    by ``seed``, so no choice made during training ever looks at the reported split.

Input size: ``input_size`` if given; otherwise the images' size when the (up to 16, evenly spaced)
probed training images are all square and of one size, else 32. Evaluation resizes the shorter
side to ``round(input_size / crop_fraction)`` and centre-crops ``input_size``; ``crop_fraction``
defaults to 0.875 (the 224/256 ImageNet convention) for inputs above 64 px and 1.0 (no border
lost) for small ones. Training uses RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), Szegedy
et al. 2015 as torchvision; scale (0.25, 1) at 64 px and below, where 8% of the area is a few
pixels) + horizontal flip.

Determinism: every sample's crop and flip are drawn from its own ``torch.Generator`` whose seed
comes from the epoch's seeded stream, so batches are a pure function of (seed, epoch, rank,
world_size) whatever ``num_workers`` is, and the global RNG is never touched.
Mean/std are computed over up to 2000 evenly spaced DIR/train images after the eval transform
(independent of ``seed`` and of the corruptions, so a teacher and its student share them).

Broken and hostile files are found when the source is built, before anything trains: every image
of every split is opened and checked with PIL's ``Image.verify`` (its header, and for PNG every
chunk's CRC up to the end: a truncated or damaged PNG, a text or zip file named ``.jpg``). An image
of more pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb; PIL only warns below
twice that) is refused too. Verifying does not decode pixels, so a JPEG cut short in its scan data
is found only when it is loaded; that, and any other decode failure, is one line naming the file,
from a DataLoader worker as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from compressor.batch import Batch
from compressor.data.base import DataSource, SplitOptions, check_batch_size, check_nonempty, check_split, split_training_pool
from compressor.data.order import AUGMENT_STREAM, SAMPLE_STREAM, augment_draws, epoch_order, generator, num_batches
from compressor.data.spec import Protocol, register_source
from compressor.data.splits import channel_stats
from compressor.errors import UserError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
DEFAULT_INPUT_SIZE = 32
PROBE_IMAGES = 16
MAX_STATS_IMAGES = 2000
SMALL_INPUT = 64


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def scan_split(folder: Path, class_to_idx: dict[str, int] | None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of one split folder; ``class_to_idx`` fixes the classes."""
    dirs = _class_dirs(folder)
    if class_to_idx is None:
        class_to_idx = {d.name: i for i, d in enumerate(dirs)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in class_to_idx:
            raise UserError(f"{d} is a class folder that DIR/train does not have; every class in {folder.name}/ must also be in train/")
        files = _files(d)
        paths += files
        labels += [class_to_idx[d.name]] * len(files)
    return paths, labels, sorted(class_to_idx, key=class_to_idx.get)


def scan_folder(directory: Path) -> tuple[tuple, tuple, tuple | None, list[str]]:
    """(train, val, test or None, class names), each split as scan_split returns it; UserError
    saying what was expected when the layout is not there."""
    expected = "expected DIR/train/<class>/*.png|jpg... and DIR/val/<class>/* (optional DIR/test/<class>/*)"
    train_dir, val_dir, test_dir = directory / "train", directory / "val", directory / "test"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise UserError(f"{directory} is not an image folder: {d.name}/ is missing; {expected}")
    classes = _class_dirs(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class sub-folders; {expected}")
    if len(classes) < 2:  # one class trains to "100%" while learning nothing
        raise UserError(f"{train_dir} has one class sub-folder ({classes[0].name}/); a classifier needs at least 2 "
                        f"classes; {expected}")
    train = scan_split(train_dir, None)
    class_names = train[2]
    class_to_idx = {n: i for i, n in enumerate(class_names)}
    empty = [n for i, n in enumerate(class_names) if i not in set(train[1])]
    if empty:
        raise UserError(f"class folder(s) {empty[:5]} in {train_dir} hold no images ({', '.join(IMG_EXTENSIONS)})")
    val = scan_split(val_dir, class_to_idx)
    test = scan_split(test_dir, class_to_idx) if test_dir.is_dir() else None
    return train, val, test, class_names


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Whatever PIL raises on one file (OSError, SyntaxError, struct.error... its plugins differ)
    becomes one line naming the file; a decompression-bomb warning is an error here."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"image {path} is too large to decode safely ({_first_line(err)}); "
                        "PIL's limit is Image.MAX_IMAGE_PIXELS") from None
    except Exception as err:  # noqa: BLE001 - a damaged file may make any decoder fail in its own way
        raise UserError(f"cannot read image {path}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def load_image(path: Path):
    from PIL import Image

    with _reading(path), Image.open(path) as im:
        return im.convert("RGB")


def verify_images(paths: list[Path]) -> None:
    """Open and verify every file (see the module docstring); UserError naming the first bad one."""
    from PIL import Image

    for path in paths:
        with _reading(path), Image.open(path) as im:
            im.verify()


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws them, from a local generator."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FolderTransform:
    """Train (random resized crop + flip, per-sample generator) and eval (resize + centre crop)."""

    def __init__(self, size: int, crop_fraction: float) -> None:
        self.size = size
        self.resize_to = max(size, int(round(size / crop_fraction)))
        self.scale = (0.08, 1.0) if size > SMALL_INPUT else (0.25, 1.0)

    def __call__(self, image, sample_seed: int) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        if sample_seed < 0:
            image = TF.center_crop(TF.resize(image, self.resize_to, antialias=True), [self.size, self.size])
        else:
            gen = torch.Generator().manual_seed(sample_seed)
            top, left, h, w = random_resized_crop_params(image.height, image.width, self.scale, gen)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            if bool(torch.randint(0, 2, (1,), generator=gen)):
                image = TF.hflip(image)
        return TF.pil_to_tensor(image)


class FolderDataset(Dataset):
    """Items are keyed by (position in split, per-sample seed or -1 for the eval transform)."""

    def __init__(self, paths: list[Path], labels: list[int], transform: FolderTransform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        position, sample_seed = key
        return self.transform(load_image(self.paths[position]), sample_seed), self.labels[position], position


class FolderSource(DataSource):
    def __init__(self, *, spec: str, splits: dict[str, tuple[list[Path], list[int]]], stats_paths: list[Path],
                 clean_train_labels: list[int], class_names: list[str], input_size: int, crop_fraction: float,
                 num_workers: int, options: SplitOptions, device: str | torch.device) -> None:
        super().__init__()
        self.spec, self.name = spec, "imagefolder"
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.input_shape = (3, input_size, input_size)
        self.options = options
        self.num_workers = num_workers
        self.transform = FolderTransform(input_size, crop_fraction)
        self.datasets = {s: FolderDataset(p, y, self.transform) for s, (p, y) in splits.items()}
        self.clean_train_labels = torch.tensor(clean_train_labels, dtype=torch.int64)
        self.device = torch.device(device)
        self.mean, self.std = self._stats(stats_paths)

    def _stats(self, pool: list[Path]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        step = max(1, len(pool) // MAX_STATS_IMAGES)
        picked = pool[::step][:MAX_STATS_IMAGES]
        images = torch.stack([self.transform(load_image(p), -1) for p in picked])
        return channel_stats(images)

    def to(self, device: str | torch.device) -> "FolderSource":
        self.device = torch.device(device)
        return self

    def split_size(self, split: str) -> int:
        return len(self.datasets[check_split(split)])

    def targets(self, split: str) -> torch.Tensor:
        return torch.tensor(self.datasets[check_split(split)].labels, dtype=torch.int64)

    def loader(self, split: str, batch_size: int, *, shuffle: bool, augment: bool, drop_last: bool = False,
               seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> "FolderLoader":
        check_split(split)
        check_batch_size(batch_size)
        return FolderLoader(self, split, batch_size, shuffle, augment, drop_last, seed, epoch, rank, world_size)

    def sample(self, split: str, n: int, seed: int = 0) -> Batch:
        dataset = self.datasets[check_split(split)]
        positions = torch.randperm(len(dataset), generator=generator(SAMPLE_STREAM, seed))[: max(0, int(n))]
        items = [dataset[(int(p), -1)] for p in positions]
        x = torch.stack([it[0] for it in items]) if items else torch.zeros((0, *self.input_shape), dtype=torch.uint8)
        return Batch(self.normalize(x.to(self.device)), torch.tensor([it[1] for it in items], dtype=torch.int64, device=self.device),
                     positions.to(self.device))


class FolderLoader:
    """One epoch of one rank's batches through a DataLoader; re-iterating replays the same batches."""

    def __init__(self, source: FolderSource, split: str, batch_size: int, shuffle: bool, augment: bool,
                 drop_last: bool, seed: int, epoch: int, rank: int, world_size: int) -> None:
        self.source, self.split, self.batch_size, self.drop_last = source, split, batch_size, drop_last
        order = epoch_order(source.split_size(split), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        if augment:
            gen = generator(AUGMENT_STREAM, seed, epoch, 0, 1)  # one process's draws, on every rank
            seeds = augment_draws(source.split_size(split), rank, world_size,
                                  lambda n: torch.randint(0, 2**62, (n,), generator=gen))
        else:
            seeds = torch.full((order.numel(),), -1, dtype=torch.int64)
        self.keys = list(zip(order.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return num_batches(len(self.keys), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        device = self.source.device
        loader = DataLoader(
            self.source.datasets[self.split],
            batch_size=self.batch_size,
            sampler=self.keys,
            drop_last=self.drop_last,
            num_workers=self.source.num_workers,
            multiprocessing_context=_worker_start(self.source.num_workers),
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0),  # keeps DataLoader off the global RNG
        )
        try:
            for x, y, index in loader:
                x = x.to(device, non_blocking=True)
                yield Batch(self.source.normalize(x), y.to(device, non_blocking=True), index.to(device, non_blocking=True))
        except UserError as err:
            raise _from_worker(err) from None


def _from_worker(err: UserError) -> UserError:
    """A DataLoader worker's UserError comes back with the worker's traceback as its message: keep
    the one line it was raised with."""
    lines = str(err).strip().splitlines()
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    if len(lines) > 1 and lines[-1].startswith(prefix):
        return UserError(lines[-1][len(prefix):])
    return err


def _probe_size(paths: list[Path]) -> int:
    from PIL import Image

    step = max(1, len(paths) // PROBE_IMAGES)
    sizes = set()
    for p in paths[::step][:PROBE_IMAGES]:
        with _reading(p), Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) == 1:
        w, h = sizes.pop()
        if w == h:
            return w
    return DEFAULT_INPUT_SIZE


# ImageNet-style folders: 90 epochs, batch 64, SGD Nesterov lr 0.05, cosine, weight decay 5e-4; also the
# protocol of any source that declares none (compressor.data.spec.FALLBACK_PROTOCOL).
PROTOCOL = Protocol("imagefolder", {
    "epochs": 90, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "schedule": "cosine",
})


@register_source("imagefolder", needs_dir=True, summary="DIR/train/<class>/*, DIR/val/<class>/*, optional DIR/test/<class>/*",
                 protocol=PROTOCOL, rank=30)
def build_imagefolder(directory: Path, *, spec: str, options: SplitOptions, device: str | torch.device = "cpu",
                      input_size: int | None = None, num_workers: int | None = None, crop_fraction: float | None = None) -> FolderSource:
    if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
        raise UserError(f"input_size {input_size!r} is invalid: give a positive number of pixels")
    if crop_fraction is not None and not 0 < crop_fraction <= 1:
        raise UserError(f"crop_fraction {crop_fraction!r} is outside (0, 1]")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise UserError(f"num_workers {num_workers!r} is invalid: give 0 (load in the main process) or more")
    (train_paths, train_labels, _), (val_paths, val_labels, _), test, class_names = scan_folder(directory)
    has_test = test is not None
    pool_labels = torch.tensor(train_labels, dtype=torch.int64)
    split = split_training_pool(pool_labels, len(class_names), options, hold_out_val=not has_test)
    splits = {
        "train": ([train_paths[i] for i in split.train_positions.tolist()], split.train_labels.tolist()),
    }
    if has_test:
        splits["val"] = (val_paths, val_labels)
        splits["test"] = (test[0], test[1])
    else:
        splits["val"] = ([train_paths[i] for i in split.val_positions.tolist()], pool_labels[split.val_positions].tolist())
        splits["test"] = (val_paths, val_labels)
    check_nonempty({s: len(splits[s][0]) for s in ("train", "val", "test")}, options, len(train_paths))
    verify_images(train_paths + val_paths + (test[0] if has_test else []))  # before training, not after an epoch
    size = input_size or _probe_size(train_paths)
    return FolderSource(
        spec=spec,
        splits=splits,
        stats_paths=train_paths,
        clean_train_labels=split.clean_train_labels.tolist(),
        class_names=class_names,
        input_size=size,
        crop_fraction=crop_fraction or (1.0 if size <= SMALL_INPUT else 0.875),
        num_workers=min(4, os.cpu_count() or 1) if num_workers is None else num_workers,
        options=options,
        device=device,
    )


def _worker_start(num_workers: int) -> str | None:
    """How loader workers start: forked (torch's default) unless a multithreaded runtime is loaded in
    this process (JAX, which the tflite export target brings): forking it can deadlock the worker,
    so they start from a fork server instead."""
    import multiprocessing
    import sys

    if num_workers and "jax" in sys.modules and "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return None

