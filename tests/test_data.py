"""Data sources: split sizes, formats on disk, augmentation alignment, corruptions, determinism, errors."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from compressor.data import load_source
from compressor.data.augment import CropFlip, crop_flip
from compressor.data.corruptions import imbalance_counts
from compressor.data.order import epoch_order
from compressor.data.splits import stratified_counts
from compressor.errors import UserError
from fake_data import label_value, write_cifar, write_imagefolder
from tests.conftest import run_module_cli


def pixels(src, x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: back to 0..255 pixel values."""
    mean = torch.tensor(src.mean).view(1, -1, 1, 1)
    std = torch.tensor(src.std).view(1, -1, 1, 1)
    return (x.cpu() * std + mean) * 255.0


def collect(loader):
    return [tuple(t.clone() for t in b) for b in loader]


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("c10"), kind="cifar10", per_class_train=10, per_class_test=2)


# --- digits ----------------------------------------------------------------------------------
def test_digits_documented_split_sizes(digits):
    sizes = {s: digits.split_size(s) for s in ("train", "val", "test")}
    assert sizes == {"train": 1294, "val": 144, "test": 359}
    assert sum(sizes.values()) == 1797
    assert digits.num_train == 1294
    assert (digits.name, digits.num_classes, digits.input_shape) == ("digits", 10, (1, 8, 8))
    assert digits.class_names == [str(d) for d in range(10)]
    # stratified: every class keeps ~20% in test
    assert all(35 <= n <= 37 for n in digits.class_counts("test"))
    # splits are disjoint rows of the one uint8 tensor
    rows = torch.cat([digits.rows[s] for s in ("train", "val", "test")])
    assert rows.unique().numel() == 1797 and digits.images.dtype == torch.uint8


def test_digits_test_split_ignores_seed_val_follows_it(digits):
    other = load_source("digits", seed=7)
    assert torch.equal(other.rows["test"], digits.rows["test"])
    assert not torch.equal(other.rows["val"], digits.rows["val"])
    again = load_source("digits")
    assert torch.equal(again.rows["val"], digits.rows["val"]) and torch.equal(again.targets("train"), digits.targets("train"))
    assert other.mean == digits.mean and other.std == digits.std  # normalisation from the fixed pool


def test_digits_batches_normalised_and_aligned(digits):
    xs, ys, idx = zip(*digits.loader("train", 256, shuffle=False, augment=False))
    x, y, index = torch.cat(xs), torch.cat(ys), torch.cat(idx)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and index.dtype == torch.int64
    assert torch.equal(index, torch.arange(1294)) and torch.equal(y, digits.targets("train"))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05
    raw = digits.images[digits.rows["train"]].float()
    assert torch.allclose(pixels(digits, x), raw, atol=1e-3)


def test_stratified_counts_exact_total():
    assert stratified_counts([178, 182, 177], 0.2) == [36, 36, 35]  # 107.4 -> 107: remainders .6,.4,.4
    assert sum(stratified_counts([2] * 100, 0.1)) == 20  # tiny classes still give a val split


# --- augmentation ----------------------------------------------------------------------------
def test_crop_flip_matches_reference():
    images = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    params = CropFlip(pad=2, flip=True).draw_params(6, gen)
    out = crop_flip(images, params, pad=2)
    padded = F.pad(images, (2, 2, 2, 2))
    for n, (dy, dx, flip) in enumerate(params.tolist()):
        ref = padded[n, :, dy : dy + 5, dx : dx + 7]
        assert torch.equal(out[n], ref.flip(-1) if flip else ref)
    centre = torch.tensor([[2, 2, 0], [2, 2, 1], [0, 0, 0]])
    out = crop_flip(images[:3], centre, pad=2)
    assert torch.equal(out[0], images[0]) and torch.equal(out[1], images[1].flip(-1))
    assert (out[2, :, :2, :] == 0).all() and torch.equal(out[2, :, 2:, 2:], images[2, :, :3, :5])


def test_digits_augmentation_shifts_without_flip():
    params = CropFlip(pad=1, flip=False).draw_params(1000, torch.Generator().manual_seed(1))
    assert params[:, :2].min() == 0 and params[:, :2].max() == 2 and (params[:, 2] == 0).all()


def test_cifar_augmentation_keeps_shape_and_label_alignment(cifar10_dir):
    src = load_source(f"cifar10:{cifar10_dir}")
    seen_border_zero = False
    for b in src.loader("train", 16, shuffle=True, augment=True, seed=3, epoch=1):
        assert b.x.shape[1:] == (3, 32, 32)
        px = pixels(src, b.x)
        centre = px[:, :, 4:28, 4:28]  # never reached by the 4-pixel padding
        expected = torch.tensor([label_value(int(c)) for c in b.y], dtype=torch.float32).view(-1, 1, 1, 1)
        assert torch.allclose(centre, expected.expand_as(centre), atol=1e-3)
        assert torch.equal(b.y, src.targets("train")[b.index])
        seen_border_zero |= bool((px[:, :, 0, :].abs() < 1e-3).any())
    assert seen_border_zero  # crops really shift


# --- CIFAR on disk ---------------------------------------------------------------------------
def test_fake_cifar_is_in_the_published_pickle_format(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as fh:
        as_torchvision = pickle.load(fh, encoding="latin1")  # how torchvision reads it
    with open(path, "rb") as fh:
        as_bytes = pickle.load(fh, encoding="bytes")
    assert {"data", "labels"} <= set(as_torchvision) and {b"data", b"labels"} <= set(as_bytes)
    assert as_torchvision["data"].dtype == "uint8" and as_torchvision["data"].shape[1] == 3072


def test_cifar10_loads(cifar10_dir):
    for spec_dir in (cifar10_dir, cifar10_dir / "cifar-10-batches-py"):
        src = load_source(f"cifar10:{spec_dir}")
        assert (src.name, src.num_classes, src.input_shape) == ("cifar10", 10, (3, 32, 32))
        assert src.class_names == [f"class{c}" for c in range(10)]
        assert {s: src.split_size(s) for s in ("train", "val", "test")} == {"train": 90, "val": 10, "test": 20}
        assert src.mean == (0.4914, 0.4822, 0.4465) and src.std == (0.2470, 0.2435, 0.2616)
        assert src.class_counts("val") == [1] * 10
    test = src.sample("test", 100)
    assert test.x.shape == (20, 3, 32, 32)
    assert torch.allclose(pixels(src, test.x)[:, 0, 0, 0], torch.tensor([float(label_value(int(c))) for c in test.y]), atol=1e-3)


def test_cifar100_loads_flat_dir_and_protocol5(tmp_path):
    write_cifar(tmp_path, kind="cifar100", per_class_train=2, per_class_test=1, nested=False, protocol=5)
    src = load_source(f"cifar100:{tmp_path}")
    assert (src.name, src.num_classes, src.input_shape) == ("cifar100", 100, (3, 32, 32))
    assert src.class_names[:2] == ["fine0", "fine1"] and len(src.class_names) == 100
    assert (src.split_size("train"), src.split_size("val"), src.split_size("test")) == (180, 20, 100)
    assert src.mean == (0.5071, 0.4865, 0.4409) and src.std == (0.2673, 0.2564, 0.2762)
    desc = src.describe()
    assert desc["name"] == "cifar100" and desc["input_shape"] == [3, 32, 32] and len(desc["class_names"]) == 100
    json.dumps(desc)
    torch.save(desc, tmp_path / "desc.pt")
    assert torch.load(tmp_path / "desc.pt", weights_only=True) == desc  # what a checkpoint records


def test_cifar_rejects_code_in_pickle(tmp_path):
    write_cifar(tmp_path, kind="cifar10", per_class_train=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(UserError, match="not allowed"):
        load_source(f"cifar10:{tmp_path}")


# --- image folders ---------------------------------------------------------------------------
def test_imagefolder_without_test_uses_val_as_test(tmp_path):
    write_imagefolder(tmp_path, per_class={"train": 10, "val": 2})
    src = load_source(f"imagefolder:{tmp_path}", num_workers=0)
    assert (src.name, src.class_names, src.input_shape) == ("imagefolder", ["cat", "dog", "eel"], (3, 12, 12))
    assert {s: src.split_size(s) for s in ("train", "val", "test")} == {"train": 27, "val": 3, "test": 6}
    for b in src.loader("train", 8, shuffle=True, augment=True, epoch=2):
        assert b.x.shape[1:] == (3, 12, 12)
        expected = torch.tensor([float(label_value(int(c))) for c in b.y]).view(-1, 1, 1, 1)
        assert (pixels(src, b.x) - expected).abs().max() <= 1.01  # resampling a flat image stays flat
    assert src.mean[0] == pytest.approx(sum(label_value(c) for c in range(3)) / 3 / 255, abs=1e-4)


def test_imagefolder_with_test_and_input_size(tmp_path):
    write_imagefolder(tmp_path, per_class={"train": 4, "val": 2, "test": 3}, size=(20, 16))
    src = load_source(f"imagefolder:{tmp_path}", num_workers=0)
    assert src.input_shape == (3, 32, 32)  # non-square images: the default 32
    assert {s: src.split_size(s) for s in ("train", "val", "test")} == {"train": 12, "val": 6, "test": 9}
    src = load_source(f"imagefolder:{tmp_path}", num_workers=0, input_size=8)
    b = next(iter(src.loader("test", 4, shuffle=False, augment=False)))
    assert b.x.shape == (4, 3, 8, 8) and torch.equal(b.index, torch.arange(4))


def test_imagefolder_deterministic_across_worker_counts(tmp_path):
    write_imagefolder(tmp_path, per_class={"train": 6, "val": 1}, encode_labels=False, size=(16, 16))
    src = load_source(f"imagefolder:{tmp_path}", num_workers=0)
    first = collect(src.loader("train", 4, shuffle=True, augment=True, seed=1, epoch=5))
    src.num_workers = 2
    state = torch.get_rng_state()
    second = collect(src.loader("train", 4, shuffle=True, augment=True, seed=1, epoch=5))
    assert torch.equal(state, torch.get_rng_state())
    assert all(all(torch.equal(a, b) for a, b in zip(p, q)) for p, q in zip(first, second))
    other = collect(src.loader("train", 4, shuffle=True, augment=True, seed=1, epoch=6))
    assert not torch.equal(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in other]))


# --- corruptions -----------------------------------------------------------------------------
def test_label_noise_flips_exact_fraction_in_train_only(digits):
    noisy = load_source("digits", label_noise=0.2)
    n = noisy.num_train
    assert n == digits.num_train
    flipped = noisy.targets("train") != noisy.clean_train_labels
    assert int(flipped.sum()) == round(0.2 * n)  # 258.8 -> 259, every pick moves to another class
    assert torch.equal(noisy.clean_train_labels, digits.targets("train"))
    for split in ("val", "test"):
        assert torch.equal(noisy.targets(split), digits.targets(split))
    ys = torch.cat([b.y for b in noisy.loader("train", 500, shuffle=False, augment=False)])
    assert torch.equal(ys, noisy.targets("train"))
    other_seed = load_source("digits", label_noise=0.2, seed=1)
    assert int((other_seed.targets("train") != other_seed.clean_train_labels).sum()) == round(0.2 * n)


def test_imbalance_profiles_hand_computed():
    assert imbalance_counts([100] * 5, 16.0) == [100, 50, 25, 12, 6]
    assert imbalance_counts([100] * 5, 20.0, gamma=1.0) == [100, 17, 9, 6, 5]
    assert imbalance_counts([100] * 5, 20.0, gamma=2.0) == [100, 45, 17, 8, 5]
    assert imbalance_counts([120, 100, 130], 1.0) == [120, 100, 130]
    # the paper's CIFAR-10 setting: 5000 .. 250
    counts = imbalance_counts([5000] * 10, 20.0, gamma=0.2)
    assert counts[0] == 5000 and counts[-1] == 250


# the benchmark's CIFAR-10 class sizes (Sarfraz et al., Table VI): n_c = 5000 / (1 + 19 (c / 9)^gamma),
# floored, 5000 down to 250, for each gamma of the table
PAPER_COUNTS = {
    0.2: [5000, 377, 331, 307, 291, 279, 269, 262, 255, 250],
    0.6: [5000, 821, 574, 461, 394, 348, 314, 288, 267, 250],
    1.0: [5000, 1607, 957, 681, 529, 432, 365, 316, 279, 250],
    2.0: [5000, 4050, 2579, 1607, 1051, 728, 529, 400, 312, 250],
}


@pytest.mark.parametrize("gamma", sorted(PAPER_COUNTS))
def test_imbalanced_cifar10_train_and_val_together_have_the_papers_class_sizes(gamma):
    """CIFAR-10's 50000 training images (5000 a class): the kept images of each class, train and
    validation together, are the paper's count; validation is a stratified 10% of them, so both
    splits keep the paper's class proportions; the test split is untouched."""
    from compressor.data.base import SplitOptions, split_training_pool

    pool = torch.arange(10).repeat_interleave(5000)
    options = SplitOptions(val_fraction=0.1, seed=3, imbalance=20.0, imbalance_gamma=gamma)
    split = split_training_pool(pool, 10, options, hold_out_val=True)
    train = torch.bincount(pool[split.train_positions], minlength=10)
    val = torch.bincount(pool[split.val_positions], minlength=10)
    assert (train + val).tolist() == PAPER_COUNTS[gamma] == imbalance_counts([5000] * 10, 20.0, gamma=gamma)
    assert val[0] == 500 and val[-1] == 25  # 10% of 5000 and of 250
    assert all(abs(v - 0.1 * n) <= 1 for v, n in zip(val.tolist(), PAPER_COUNTS[gamma]))
    assert not set(split.train_positions.tolist()) & set(split.val_positions.tolist())


def test_imbalance_gives_stated_counts_on_train_and_val_together(digits):
    for kwargs in ({"imbalance": 10.0}, {"imbalance": 8.0, "imbalance_gamma": 0.6}):
        src = load_source("digits", **kwargs)
        pool = [t + v for t, v in zip(digits.class_counts("train"), digits.class_counts("val"))]
        together = [t + v for t, v in zip(src.class_counts("train"), src.class_counts("val"))]
        assert together == imbalance_counts(pool, kwargs["imbalance"], kwargs.get("imbalance_gamma"))
        kept = set(digits.rows["train"].tolist()) | set(digits.rows["val"].tolist())
        assert set(src.rows["train"].tolist()) | set(src.rows["val"].tolist()) <= kept
        assert torch.equal(src.rows["test"], digits.rows["test"])
        assert src.num_train == sum(src.class_counts("train"))


# --- determinism and sharding ----------------------------------------------------------------
def test_same_seed_epoch_same_batches_other_epoch_other_order(digits):
    state = torch.get_rng_state()
    a = collect(digits.loader("train", 100, shuffle=True, augment=True, seed=4, epoch=2))
    b = collect(digits.loader("train", 100, shuffle=True, augment=True, seed=4, epoch=2))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    assert len(a) == len(digits.loader("train", 100, shuffle=True, augment=True)) == 13
    assert all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))
    c = collect(digits.loader("train", 100, shuffle=True, augment=True, seed=4, epoch=3))
    ia, ic = torch.cat([t[2] for t in a]), torch.cat([t[2] for t in c])
    assert not torch.equal(ia, ic) and torch.equal(ia.sort().values, ic.sort().values)
    d = collect(digits.loader("train", 100, shuffle=True, augment=True, seed=5, epoch=2))
    assert not torch.equal(ia, torch.cat([t[2] for t in d]))
    loader = digits.loader("train", 100, shuffle=True, augment=True, seed=4, epoch=2)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(collect(loader), collect(loader)))  # re-iterable
    assert len(digits.loader("train", 100, shuffle=False, augment=False, drop_last=True)) == 12


def test_ranks_get_disjoint_equal_shards(digits):
    for split, n in (("val", 144), ("test", 359)):
        shards = [torch.cat([b.index for b in digits.loader(split, 32, shuffle=True, augment=False, seed=0, epoch=1,
                                                              rank=r, world_size=2)]) for r in range(2)]
        assert shards[0].numel() == shards[1].numel() == (n + 1) // 2
        union = torch.cat(shards)
        assert union.unique().numel() == n  # everything covered
        overlap = set(shards[0].tolist()) & set(shards[1].tolist())
        assert len(overlap) == 2 * ((n + 1) // 2) - n  # only the DistributedSampler-style padding repeats
    order = epoch_order(10, shuffle=False, seed=0, epoch=0, rank=1, world_size=3)
    assert order.tolist() == [1, 4, 7, 0]


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_two_ranks_together_see_the_single_process_batches_augmented_alike(source, digits, tmp_path):
    # DDP trains what one process trains only if every global batch is the same, augmentation
    # included; before, each rank drew its own crops and flips (issue 18, item 6)
    if source == "imagefolder":
        write_imagefolder(tmp_path, per_class={"train": 6, "val": 1}, encode_labels=False, size=(16, 16))
        src = load_source(f"imagefolder:{tmp_path}", num_workers=0)
    else:
        src = digits
    kwargs = dict(shuffle=True, augment=True, seed=5, epoch=2)
    n, batch = src.split_size("train"), 8
    one = list(src.loader("train", batch, **kwargs))
    ranks = [list(src.loader("train", batch // 2, rank=r, world_size=2, **kwargs)) for r in range(2)]
    assert n % 2 == 0 and len(one) == len(ranks[0]) == len(ranks[1])
    for whole, *halves in zip(one, *ranks):
        merged = {int(i): (x, y) for h in halves for i, x, y in zip(h.index, h.x, h.y)}
        assert sorted(merged) == sorted(whole.index.tolist())
        for i, x, y in zip(whole.index, whole.x, whole.y):
            assert torch.equal(merged[int(i)][0], x) and merged[int(i)][1] == y


def test_sample_is_seeded_and_unaugmented(digits):
    a, b = digits.sample("val", 16, seed=3), digits.sample("val", 16, seed=3)
    assert a.x.shape == (16, 1, 8, 8) and torch.equal(a.x, b.x) and torch.equal(a.index, b.index)
    assert torch.allclose(pixels(digits, a.x), digits.images[digits.rows["val"][a.index]].float(), atol=1e-3)
    assert torch.equal(a.y, digits.targets("val")[a.index])
    assert digits.sample("val", 10_000).x.shape[0] == 144
    assert digits.to("cpu") is digits


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("emnist", {}, "unknown data spec 'emnist'.*digits, cifar10:DIR, cifar100:DIR, fashion-mnist\\[:DIR\\], mnist:DIR, imagefolder:DIR"),
        ("mnist", {}, "names no directory: write 'mnist:DIR'"),
        ("cifar10", {}, "names no directory"),
        ("cifar10:{tmp}/nope", {}, "does not exist"),
        ("cifar100:{tmp}", {}, "not a cifar100 directory.*train, test, meta"),
        ("imagefolder:{tmp}", {}, "train/ is missing"),
        ("digits:/x", {}, "takes no directory"),
        ("digits", {"val_fraction": 0.0}, "val_fraction 0.0 is outside"),
        ("digits", {"val_fraction": 1.0}, "val_fraction 1.0 is outside"),
        ("digits", {"val_fraction": 0.0001}, "val split would be empty"),
        ("digits", {"label_noise": 1.0}, r"label noise rate 1.0 is outside \[0, 1\)"),
        ("digits", {"label_noise": -0.1}, "label noise rate"),
        ("digits", {"imbalance": 0.5}, "imbalance 0.5 is invalid"),
        ("digits", {"input_size": 32}, "does not take option"),
    ],
)
def test_bad_input_is_user_error(tmp_path, spec, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_source(spec.format(tmp=tmp_path), **kwargs)


def test_bad_folder_contents(tmp_path):
    write_imagefolder(tmp_path, per_class={"train": 2, "val": 1})
    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(UserError, match="yak.*train"):
        load_source(f"imagefolder:{tmp_path}", num_workers=0)
    write_cifar(tmp_path / "c", kind="cifar10", per_class_train=1)
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing.*data_batch_3"):
        load_source(f"cifar10:{tmp_path / 'c'}")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python batch"):
        load_source(f"cifar10:{tmp_path / 'c'}")


def test_loader_argument_errors(digits):
    with pytest.raises(UserError, match="unknown split 'dev'"):
        digits.loader("dev", 8, shuffle=False, augment=False)
    with pytest.raises(UserError, match="batch size 0"):
        digits.loader("train", 0, shuffle=False, augment=False)
    with pytest.raises(UserError, match="rank 2 / world_size 2"):
        digits.loader("train", 8, shuffle=False, augment=False, rank=2, world_size=2)


# --- CLI -------------------------------------------------------------------------------------
def test_data_info_cli(cli, cifar10_dir):
    result = cli("data-info", "digits")
    assert result.exit_code == 0
    assert "train 1294, val 144, test 359" in result.output and "1 x 8 x 8" in result.output
    result = cli("data-info", f"cifar10:{cifar10_dir}", "--json")
    info = json.loads(result.output)
    assert info["splits"] == {"train": 90, "val": 10, "test": 20} and info["num_classes"] == 10


def test_data_info_cli_missing_dir_exits_2(tmp_path):
    proc = run_module_cli("data-info", f"cifar10:{tmp_path / 'absent'}")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_imbalance_gamma_alone_uses_the_papers_ratio():
    from compressor.data import load_source

    balanced = load_source("digits")
    skewed = load_source("digits", imbalance_gamma=0.2)
    counts = skewed.class_counts("train")
    assert skewed.num_train < balanced.num_train
    assert max(counts) / min(counts) >= 19  # rho = 20, up to flooring


def test_digits_read_from_the_bundled_file_equal_scikit_learns_loader():
    """digits.csv.gz is read directly (no sklearn.datasets import at start-up); same pixels and labels."""
    from sklearn.datasets import load_digits

    from compressor.data.digits import digits_arrays

    images, labels = digits_arrays()
    bunch = load_digits()
    expected = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    assert torch.equal(images, expected)
    assert torch.equal(labels, torch.from_numpy(bunch.target).to(torch.int64))


def test_loader_workers_start_from_a_fork_server_once_a_multithreaded_runtime_is_loaded(monkeypatch):
    # the tflite target leaves JAX (multithreaded) loaded: a forked worker can then deadlock
    import sys
    import types

    from compressor.data.imagefolder import _worker_start

    monkeypatch.delitem(sys.modules, "jax", raising=False)
    assert _worker_start(2) is None and _worker_start(0) is None
    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    assert _worker_start(2) == "forkserver" and _worker_start(0) is None
