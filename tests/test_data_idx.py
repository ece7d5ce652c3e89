"""Fashion-MNIST and MNIST sources: the IDX format in every layout, its errors, and the real Debian files."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from compressor.data import load_source
from compressor.data import idx
from compressor.errors import UserError
from fake_data import IDX_NAMES, idx_bytes, label_value, write_idx

REAL_FMNIST = idx.DEBIAN_DIR


def _pixels(src, batch) -> torch.Tensor:
    """Undo the normalisation: uint8-valued pixels of a batch."""
    return (batch.x * src.std[0] + src.mean[0]).mul(255).round()


@pytest.mark.parametrize("layout, gz, spec_dir", [
    ("flat", True, ""), ("flat", False, ""), ("FashionMNIST", True, ""), ("FashionMNIST", False, "FashionMNIST/raw"),
])
def test_fashion_mnist_layouts_load_aligned(tmp_path, layout, gz, spec_dir):
    write_idx(tmp_path, per_class_train=10, per_class_test=2, gz=gz, layout=layout)
    src = load_source(f"fashion-mnist:{tmp_path / spec_dir}")
    assert (src.name, src.num_classes, src.input_shape) == ("fashion-mnist", 10, (1, 28, 28))
    assert {s: src.split_size(s) for s in ("train", "val", "test")} == {"train": 90, "val": 10, "test": 20}
    assert src.class_counts("val") == [1] * 10 and src.class_counts("test") == [2] * 10
    assert src.class_names[0] == "T-shirt/top" and src.class_names[9] == "Ankle boot"
    assert (src.mean, src.std) == ((0.2860,), (0.3530,))
    test = next(iter(src.loader("test", 20, shuffle=False, augment=False)))
    pixels = _pixels(src, test)
    assert test.y.tolist() == list(range(10)) * 2  # the t10k labels, in file order
    assert pixels[:, 0, 0, 0].tolist() == list(range(20))  # the t10k images, in file order
    train = next(iter(src.loader("train", 90, shuffle=True, augment=True, epoch=1)))
    centre = _pixels(src, train)[:, 0, 14, 14]  # a +-2 pixel shift never moves the pad into the centre
    assert centre.tolist() == [float(label_value(int(y))) for y in train.y]


def test_mnist_in_torchvision_layout_no_flip(tmp_path):
    write_idx(tmp_path, per_class_train=10, per_class_test=1, gz=False, layout="MNIST")
    src = load_source(f"mnist:{tmp_path}", val_fraction=0.2)
    assert (src.name, src.class_names, src.mean, src.std) == ("mnist", [str(d) for d in range(10)], (0.1307,), (0.3081,))
    assert (src.split_size("train"), src.split_size("val"), src.split_size("test")) == (80, 20, 10)
    assert (src.augmentation.pad, src.augmentation.flip) == (2, False)
    fashion = load_source(f"fashion-mnist:{tmp_path}/MNIST/raw")
    assert (fashion.augmentation.pad, fashion.augmentation.flip) == (2, True)


def test_raw_file_preferred_over_gz_and_both_accepted(tmp_path):
    write_idx(tmp_path, per_class_train=2, gz=True)
    write_idx(tmp_path, per_class_train=3, gz=False)  # same names without .gz: these are read
    assert load_source(f"mnist:{tmp_path}").split_size("train") + load_source(f"mnist:{tmp_path}").split_size("val") == 30


def test_train_limit_is_a_fixed_stratified_subset(tmp_path):
    write_idx(tmp_path, per_class_train=20, per_class_test=1)
    a = load_source(f"mnist:{tmp_path}", seed=0, train_limit=50, val_fraction=0.2)
    b = load_source(f"mnist:{tmp_path}", seed=7, train_limit=50, val_fraction=0.2)
    assert a.split_size("train") + a.split_size("val") == 50
    assert a.class_counts("train") == [4] * 10 and a.class_counts("val") == [1] * 10
    pool = lambda s: set(_pixels(s, s.sample("train", 1000))[:, 0, 0, 0].tolist()) | set(  # noqa: E731
        _pixels(s, s.sample("val", 1000))[:, 0, 0, 0].tolist())
    assert pool(a) == pool(b) and len(pool(a)) == 50  # the same 50 images whatever the seed
    assert a.describe()["source_options"] == {"train_limit": 50}
    assert load_source(f"mnist:{tmp_path}").describe()["source_options"] == {}
    for bad in (5, 201, 12.5, True):
        with pytest.raises(UserError, match=f"train_limit {bad!r} is invalid.*from 10.*to 200"):
            load_source(f"mnist:{tmp_path}", train_limit=bad)


def _corrupt(folder, name, data: bytes, gz: bool = True) -> None:
    target = folder / (f"{name}.gz" if gz else name)
    target.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "train-labels-idx1-ubyte.gz").unlink(),
     r"not a mnist directory: missing in .*: train-labels-idx1-ubyte\[\.gz\] \(expected"),
    (lambda f: [(f / f"{n}.gz").unlink() for n in IDX_NAMES["train"]],
     r"missing .*train-images-idx3-ubyte\[\.gz\], train-labels-idx1-ubyte\[\.gz\]; it holds only the test files"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage"),
     r"t10k-images-idx3-ubyte.gz is a corrupt .gz file"),
    (lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(5000))[:-30]),
     r"t10k-images-idx3-ubyte.gz is a corrupt .gz file"),
    (lambda f: _corrupt(f, "train-labels-idx1-ubyte", bytes([0, 0, 8, 3]) + bytes(100)),
     r"train-labels-idx1-ubyte.gz has IDX magic number 0x00000803, expected 0x00000801 \(labels\)"),
    (lambda f: _corrupt(f, "train-images-idx3-ubyte", idx_bytes(torch.zeros(30, 28, 28, dtype=torch.uint8).numpy())[:-1]),
     r"train-images-idx3-ubyte.gz is truncated: 23535 bytes where its header \(30 x 28 x 28 images\) needs 23536"),
    (lambda f: _corrupt(f, "train-images-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0])),
     r"is truncated: 6 bytes, shorter than its 16-byte IDX header"),
    (lambda f: _corrupt(f, "t10k-labels-idx1-ubyte", idx_bytes(torch.zeros(10, dtype=torch.uint8).numpy()) + b"x"),
     r"t10k-labels-idx1-ubyte.gz is longer than its header says"),
    (lambda f: _corrupt(f, "train-labels-idx1-ubyte", idx_bytes(torch.zeros(29, dtype=torch.uint8).numpy())),
     r"train-images-idx3-ubyte.gz holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels"),
    (lambda f: _corrupt(f, "t10k-labels-idx1-ubyte", idx_bytes(torch.full((10,), 10, dtype=torch.uint8).numpy())),
     r"t10k-labels-idx1-ubyte.gz: labels must lie in 0..9, found 10"),
    (lambda f: _corrupt(f, "t10k-images-idx3-ubyte", idx_bytes(torch.zeros(10, 32, 32, dtype=torch.uint8).numpy())),
     r"t10k-images-idx3-ubyte.gz holds 32x32 images, expected 28x28"),
])
def test_bad_idx_files_are_one_line_errors(tmp_path, damage, message):
    folder = write_idx(tmp_path, per_class_train=3, per_class_test=1)
    damage(folder)
    with pytest.raises(UserError, match=message) as err:
        load_source(f"mnist:{tmp_path}")
    assert "\n" not in str(err.value)


def test_raw_gzip_without_suffix_names_the_magic(tmp_path):
    folder = write_idx(tmp_path, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(gzip.compress(b"0123"))
    with pytest.raises(UserError, match="magic number 0x1F8B08.*not a gzip file without .gz"):
        load_source(f"mnist:{tmp_path}")


def test_cli_bad_idx_exits_2_and_writes_nothing(tmp_path):
    from conftest import run_module_cli

    folder = write_idx(tmp_path / "data", per_class_train=2)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    out = tmp_path / "out" / "t.pt"
    proc = run_module_cli("train", "--arch", "resnet8", "--data", f"mnist:{folder}", "-o", str(out), "--epochs", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "t10k-labels-idx1-ubyte.gz is a corrupt .gz file" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_without_the_debian_package_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(idx, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(idx, "DEBIAN_PACKAGE", "kdcompress-test-no-such-package")  # dpkg -L finds nothing
    with pytest.raises(UserError, match=r"not installed: run `apt-get install kdcompress-test-no-such-package`, "
                                         r"or give fashion-mnist:DIR"):
        load_source("fashion-mnist")


def test_debian_files_found_through_dpkg_when_moved(monkeypatch, tmp_path):
    if shutil.which("dpkg") is None or not REAL_FMNIST.is_dir():
        pytest.skip("needs dpkg and the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(idx, "DEBIAN_DIR", tmp_path / "absent")
    assert idx.debian_dir() == REAL_FMNIST


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason=f"{REAL_FMNIST} is absent: the Debian package "
                    "dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
def test_real_fashion_mnist_from_the_debian_package():
    from compressor.data.splits import channel_stats

    src = load_source("fashion-mnist")
    assert src.spec == "fashion-mnist" and src.input_shape == (1, 28, 28)
    assert (src.split_size("train"), src.split_size("val"), src.split_size("test")) == (54000, 6000, 10000)
    pool = [a + b for a, b in zip(src.class_counts("train"), src.class_counts("val"))]
    assert pool == [6000] * 10 and src.class_counts("val") == [600] * 10 and src.class_counts("test") == [1000] * 10
    assert src.images.shape == (70000, 1, 28, 28) and src.images.dtype == torch.uint8
    # first labels of the published files (train: ankle boot, T-shirt, T-shirt, dress, ...)
    assert src.targets("test")[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    train_labels = idx.read_idx(REAL_FMNIST / "train-labels-idx1-ubyte.gz", idx.LABELS_MAGIC)
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    # the published normalisation constants are the training pool's statistics
    mean, std = channel_stats(src.images[:60000])
    assert abs(mean[0] - 0.2860) < 5e-4 and abs(std[0] - 0.3530) < 5e-4


def test_protocol_of_each_spec():
    from compressor.data import list_sources
    from recipes.protocols import PROTOCOLS, default_train, protocol_name

    assert {e.name: protocol_name(e.usage.replace("[:DIR]", "").replace("DIR", "/d")) for e in list_sources()} == {
        "digits": "digits", "cifar10": "cifar", "cifar100": "cifar", "fashion-mnist": "fashion-mnist",
        "mnist": "mnist", "imagefolder": "imagefolder"}
    assert protocol_name("Fashion-MNIST:/data") == "fashion-mnist" and protocol_name("other:/x") == "imagefolder"
    assert PROTOCOLS["mnist"] == PROTOCOLS["fashion-mnist"] == {
        "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "schedule": "cosine", "grad_clip": 5.0}
    assert default_train("fashion-mnist", "mobilenetv2_w0.5")["lr"] == 0.05  # the CIFAR low-lr rule stays CIFAR's
    assert default_train("fashion-mnist", "resnet20", epochs=60)["epochs"] == 60


def test_train_cli_on_mnist_uses_its_protocol(cli, tmp_path, monkeypatch):
    from compressor.checkpoint import load_model
    from compressor.trainer import learning_guard

    # one step on 60 images cannot learn; this test is about the protocol the run records
    monkeypatch.setattr(learning_guard, "CHANCE_FACTOR", -1.0)

    write_idx(tmp_path / "data", per_class_train=6, per_class_test=1, layout="MNIST")
    out = tmp_path / "t.pt"
    result = cli("train", "--arch", "resnet8", "--data", f"mnist:{tmp_path / 'data'}", "--epochs", "1", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    train = loaded.extra["train"]
    assert (train["batch_size"], train["lr"], train["nesterov"], train["grad_clip"], train["schedule"]) == (
        128, 0.05, True, 5.0, "cosine")
    assert loaded.meta.input_shape == (1, 28, 28) and loaded.meta.class_names == [str(d) for d in range(10)]
    assert (loaded.meta.mean, loaded.meta.std) == ((0.1307,), (0.3081,))
