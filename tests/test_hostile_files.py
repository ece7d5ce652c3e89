"""Reliability (issue 18, item 5): hostile and broken files everywhere a file is read.

Checkpoints (zip and legacy, code hidden in nested containers, ``builtins``/``os`` globals, a
tensor storage that lies about its size), CIFAR pickles, IDX files, images (a decompression bomb,
a truncated PNG, a file that is not what its extension says), ONNX files given to ``bench``, plan
and preset YAML: each is refused with one line and exit 2, runs no code and writes nothing. The
fuzz tests feed every reader seeded random bytes and mutated valid files: each must either read
the file or refuse it with a UserError, never anything else.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import struct
import zipfile
from tests.fake_data import digits_meta, one_line, write_digits_checkpoint
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compressor.checkpoint import load_model
from compressor.errors import UserError



def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _mutations(data: bytes, seed: int, count: int, *, keep: int = 0) -> list[bytes]:
    """``count`` damaged copies of ``data``: flipped bytes, cuts, inserted junk (the first ``keep``
    bytes, e.g. a signature, left alone so the reader gets past its first check)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        b = bytearray(data)
        kind = i % 3
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(keep, len(b))
                b[pos] = rng.randrange(256)
        elif kind == 1:
            b = b[: rng.randrange(keep, len(b))]
        else:
            pos = rng.randrange(keep, len(b))
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        out.append(bytes(b))
    return out


# --- plan and preset YAML ---------------------------------------------------------------------
_STAGE = {"name": "s1", "scheme": "vanilla", "arch": "resnet8", "train": {"epochs": 1}}
BAD_PLANS = {
    "stages is a number": ({"stages": 5}, "stages must be a list"),
    "a stage is a string": ({"stages": ["s1"]}, "stage 1 must be a mapping"),
    "a name escapes the run folder": ({"stages": [{**_STAGE, "name": "../../escape"}]}, "not a path"),
    "a name is a path": ({"stages": [{**_STAGE, "name": "a/b"}]}, "not a path"),
    "a name is absolute": ({"stages": [{**_STAGE, "name": "/tmp/escape"}]}, "not a path"),
    "a hidden name": ({"stages": [{**_STAGE, "name": ".."}]}, "not a path"),
    "a name is a number": ({"stages": [{**_STAGE, "name": 3}]}, "name must be text"),
    "train is a list": ({"stages": [{**_STAGE, "train": [1]}]}, "train must be a mapping"),
    "options is a list": ({"stages": [{**_STAGE, "options": [1]}]}, "options must be a mapping"),
    "arch is a list": ({"stages": [{**_STAGE, "arch": ["resnet8"]}]}, "arch must be text"),
    "method is a number": ({"stages": [{**_STAGE, "method": 5}]}, "method must be text or null"),
    "teachers is a string": ({"stages": [{**_STAGE, "teachers": "s0"}]}, "teachers must be a list"),
    "epochs is a word": ({"stages": [{**_STAGE, "train": {"epochs": "many"}}]}, "epochs must be a whole number"),
    "lr is a bool": ({"stages": [{**_STAGE, "train": {"lr": True}}]}, "lr must be a number"),
    "milestones is a string": ({"stages": [{**_STAGE, "train": {"milestones": "10,20"}}]}, "milestones must be a list"),
    "an unknown training key": ({"stages": [{**_STAGE, "train": {"epochz": 1}}]}, "unknown training setting"),
    "an unknown stage key": ({"stages": [{**_STAGE, "student": "x"}]}, "unknown field"),
    "an unknown plan key": ({"stagez": []}, "unknown plan field"),
    "budgets is a string": ({"budgets": "2MFLOPs"}, "budgets must be a list"),
    "version is a word": ({"version": "x"}, "version must be a whole number"),
    "recipe is a number": ({"recipe": 3}, "recipe must be text"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_a_bad_plan_or_preset_is_one_line_and_writes_nothing(cli, tmp_path, case):
    change, message = BAD_PLANS[case]
    plan = {"data": "digits", "stages": [_STAGE], **change}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    before = _files(tmp_path)
    for args in (["--preset", str(path), "--data", "digits", "--out", str(tmp_path / "run")],
                 ["plan", "--preset", str(path), "--data", "digits"],
                 ["distill", "--preset", str(path), "--data", "digits", "-o", str(tmp_path / "s.pt")]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line(result.output), args
    assert _files(tmp_path) == before and not (tmp_path.parent / "escape").exists()
    # the plan a run folder holds (read by --resume) gets the same checks
    from recipes.plan import Plan

    with pytest.raises(UserError, match=message.split(":")[0]):
        Plan.load(path)


def test_plan_yaml_that_would_construct_python_objects_runs_nothing(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "plan.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    result = cli("plan", "--preset", str(path), "--data", "digits")
    assert result.exit_code == 2 and "not valid YAML" in one_line(result.output)
    assert not marker.exists()


def test_plan_fuzz_random_and_mutated_yaml_is_read_or_refused(tmp_path):
    from recipes.plan import Plan

    valid = yaml.safe_dump({"data": "digits", "stages": [{**_STAGE, "teachers": [], "options": {"a": 1}}]}).encode()
    rng = random.Random(0)
    inputs = [rng.randbytes(rng.randint(1, 200)) for _ in range(30)] + _mutations(valid, 1, 60)
    refused = 0
    for data in inputs:
        try:
            Plan.from_yaml(data.decode("utf-8", errors="replace"))
        except UserError:
            refused += 1
    assert refused > len(inputs) // 2  # most damage is refused; none of it may raise anything else


# --- ONNX files given to bench ------------------------------------------------------------------
def _onnx(path: Path, inputs, nodes=None) -> str:
    import onnx
    from onnx import TensorProto, helper

    nodes = nodes or [helper.make_node("Identity", [inputs[0].name], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_bench_refuses_onnx_files_it_cannot_time_in_one_line(cli, tmp_path):
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    image = ["N", 3, 8, 8]
    cases = {
        _onnx(tmp_path / "vector.onnx", [vi("x", TensorProto.FLOAT, [1, 10])]): "FLOAT of rank 2",
        _onnx(tmp_path / "ids.onnx", [vi("x", TensorProto.INT64, image)]): "INT64 of rank 4",
        _onnx(tmp_path / "two.onnx", [vi("a", TensorProto.FLOAT, image), vi("b", TensorProto.FLOAT, image)],
              [helper.make_node("Add", ["a", "b"], ["y"])]): "takes 2 inputs",
        _onnx(tmp_path / "none.onnx", [], [helper.make_node(
            "Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0]))]): "takes 0 inputs",
        _onnx(tmp_path / "badop.onnx", [vi("x", TensorProto.FLOAT, image)],
              [helper.make_node("NoSuchOp", ["x"], ["y"])]): "onnxruntime cannot load",
    }
    rng = random.Random(3)
    for i in range(4):  # malformed protobuf: random bytes, and a real export cut short
        (tmp_path / f"junk{i}.onnx").write_bytes(rng.randbytes(rng.randint(1, 400)))
        cases[str(tmp_path / f"junk{i}.onnx")] = "neither an ONNX model"
    before = _files(tmp_path)
    for path, message in cases.items():
        result = cli("bench", path, "--runs", "1", "--warmup", "0", "--min-time", "0", "--threads", "1",
                     "--json", str(tmp_path / "out.json"))
        assert result.exit_code == 2, (path, result.output)
        assert message in one_line(result.output), path
    assert _files(tmp_path) == before


def test_bench_times_a_model_with_a_fixed_batch_at_that_batch(cli, tmp_path):
    from onnx import TensorProto, helper

    path = _onnx(tmp_path / "fixed.onnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])])
    result = cli("bench", path, "--runs", "1", "--warmup", "0", "--min-time", "0", "--threads", "1", "--batch", "4")
    assert result.exit_code == 0, result.output
    assert "fixed at 1" in result.output


# --- images in an image folder --------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height grey pixels: what a decompression bomb looks like."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _valid_png(seed: int = 0, size: int = 12) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _valid_jpeg(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_images() -> dict[str, tuple[bytes, str]]:
    png = _valid_png()
    damaged = bytearray(png)
    damaged[len(png) // 2] ^= 0xFF  # inside the pixel data: its chunk CRC no longer matches
    return {
        "bomb.png": (_png_header_only(100_000, 100_000), "too large to decode safely"),
        "warned-bomb.png": (_png_header_only(10_000, 10_000), "too large to decode safely"),  # PIL only warns
        "truncated.png": (png[: len(png) // 2], "cannot read image"),
        "damaged.png": (bytes(damaged), "cannot read image"),
        "text.jpg": (b"this is a note, not a photo\n", "cannot read image"),
        "archive.png": (b"PK\x03\x04" + bytes(60), "cannot read image"),
        "empty.jpeg": (b"", "cannot read image"),
        "jpeg-header-only.jpg": (b"\xff\xd8\xff\xe0" + bytes(12), "cannot read image"),
    }


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_image_folder_with_a_broken_or_hostile_image_is_refused_before_training(tmp_path, split):
    from compressor.data import load_source
    from tests.fake_data import write_imagefolder

    for name, (data, message) in _bad_images().items():
        root = tmp_path / f"{split}-{name}"
        write_imagefolder(root, per_class={"train": 4, "val": 2})
        bad = root / split / "dog" / name
        bad.write_bytes(data)
        with pytest.raises(UserError, match=message) as err:
            load_source(f"imagefolder:{root}", num_workers=0)
        assert str(bad) in str(err.value) and "\n" not in str(err.value), name


def test_train_on_a_folder_with_a_truncated_png_in_val_stops_at_once_in_one_line(cli, tmp_path):
    from tests.fake_data import write_imagefolder

    write_imagefolder(tmp_path / "data", per_class={"train": 4, "val": 2})
    png = (tmp_path / "data" / "val" / "cat" / "0.png").read_bytes()
    (tmp_path / "data" / "val" / "cat" / "0.png").write_bytes(png[: len(png) // 2])
    result = cli("train", "--arch", "resnet8", "--data", f"imagefolder:{tmp_path / 'data'}", "-o",
                 str(tmp_path / "m.pt"), "--epochs", "1")
    assert result.exit_code == 2
    assert "val/cat/0.png" in one_line(result.output)  # no epoch line: refused before training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_jpeg_cut_in_its_scan_data_is_one_line_even_from_a_loader_worker(tmp_path):
    """Verifying reads no JPEG pixels (the statistics pass decodes at most 2000 train images): a file
    found broken at load, here in a DataLoader worker process, is one line too."""
    from compressor.data import load_source
    from tests.fake_data import write_imagefolder

    write_imagefolder(tmp_path, per_class={"train": 4, "val": 2})
    source = load_source(f"imagefolder:{tmp_path}", num_workers=1)
    jpeg = _valid_jpeg()
    bad = tmp_path / "train" / "eel" / "1.png"
    bad.write_bytes(jpeg[: len(jpeg) * 2 // 3])  # damaged after the source was built
    with pytest.raises(UserError) as err:
        for split in ("train", "val"):  # the hold-out val split is drawn from train/
            for _ in source.loader(split, 4, shuffle=False, augment=False):
                pass
    assert str(err.value).startswith(f"cannot read image {bad}: ") and "truncated" in str(err.value)
    assert "\n" not in str(err.value)


def test_image_fuzz_random_and_mutated_files_are_read_or_refused(tmp_path):
    from compressor.data.imagefolder import load_image, verify_images

    rng = random.Random(5)
    inputs = [rng.randbytes(rng.randint(0, 300)) for _ in range(20)]
    inputs += _mutations(_valid_png(1), 6, 30, keep=8) + _mutations(_valid_jpeg(2), 7, 30, keep=2)
    refused = 0
    for i, data in enumerate(inputs):
        path = tmp_path / f"{i}.png"
        path.write_bytes(data)
        try:
            verify_images([path])
            load_image(path)
        except UserError as err:
            assert "\n" not in str(err)
            refused += 1
    assert refused >= 50  # all random bytes and the damaged PNGs; some damaged JPEGs still decode


# --- checkpoints --------------------------------------------------------------------------------
class _Call:
    """Unpickling this calls ``fn(*args)``: a pickle that runs code."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)




def _rewrite_zip(src: Path, dst: Path, change) -> Path:
    """Copy a zip checkpoint, passing each member's bytes through ``change(name, data)`` (CRCs redone)."""
    import copy

    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            new.writestr(copy.copy(info), change(info.filename, old.read(info.filename)))
    return dst


def _lying_checkpoints(tmp_path: Path) -> dict[Path, str]:
    """Checkpoints whose tensor storages lie about their size, zip and legacy."""
    n = 123457
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(n)}, plain)
    numel = b"J" + struct.pack("<i", n)
    cases = {}
    for label, claim in (("huge", b"\x8a\x06" + (2**40).to_bytes(6, "little")), ("negative", b"J" + struct.pack("<i", -5)),
                         ("bigger", b"J" + struct.pack("<i", n + 1))):
        cases[_rewrite_zip(plain, tmp_path / f"storage-{label}.pt", lambda name, data, c=claim:
                           data.replace(numel, c, 1) if name.endswith("data.pkl") else data)] = "not a PyTorch checkpoint"
    # the storage is right, the tensor built on it claims more elements than it holds
    cases[_rewrite_zip(plain, tmp_path / "view-bigger.pt", lambda name, data: data[::-1].replace(
        numel[::-1], (b"J" + struct.pack("<i", 4 * n))[::-1], 1)[::-1] if name.endswith("data.pkl") else data)] = \
        "not a PyTorch checkpoint"
    cases[_rewrite_zip(plain, tmp_path / "storage-short.pt", lambda name, data:
                       data[: len(data) // 2] if name.endswith("/data/0") else data)] = "not a PyTorch checkpoint"
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(n)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    at = raw.rfind(struct.pack("<q", n))  # the storage's own size field, just before its bytes
    for label, claim in (("huge", 2**40), ("bigger", n + 1), ("negative", -1)):
        path = tmp_path / f"legacy-{label}.pt"
        path.write_bytes(raw[:at] + struct.pack("<q", claim) + raw[at + 8:])
        cases[path] = "not a PyTorch checkpoint"
    return cases


def test_checkpoints_that_hide_code_or_lie_about_sizes_are_refused_by_every_reader(cli, tmp_path):
    from compressor.trainer.state import load_state

    marker = tmp_path / "pwned"
    payloads = {"open": _Call(open, str(marker), "w"), "builtins.exec": _Call(exec, f"open({str(marker)!r}, 'w')"),
                "builtins.eval": _Call(eval, f"open({str(marker)!r}, 'w')"), "os.system": _Call(os.system, f"touch {marker}")}
    cases: dict[Path, str] = {}
    good = torch.load(write_digits_checkpoint(tmp_path / "good.pt"), weights_only=True)
    for name, payload in payloads.items():
        hidden = {**good, "state_dict": {**good["state_dict"], "extra": [{"deep": (1, [payload])}]}}
        for legacy in (False, True):
            path = tmp_path / f"{name}-{'legacy' if legacy else 'zip'}.pt"
            torch.save(hidden, path, _use_new_zipfile_serialization=not legacy)
            cases[path] = "--trust-checkpoint"
        path = tmp_path / f"{name}-pickle.pt"
        path.write_bytes(pickle.dumps({"meta": good["meta"], "extra": {"x": [payload]}}))
        cases[path] = "--trust-checkpoint"
    cases.update(_lying_checkpoints(tmp_path))
    for field, claim in (("num_classes", 10**10), ("in_chans", 10**6)):  # the model would be built first
        lying = {**good, "meta": {**good["meta"], field: claim, "class_names": None}}
        torch.save(lying, tmp_path / f"meta-{field}.pt")
        cases[tmp_path / f"meta-{field}.pt"] = "its meta record describes a resnet8 of"
    out = tmp_path / "out"
    out.mkdir()
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_model(path)
        for args in (["eval", str(path)], ["export", str(path), "-o", str(out / "x.onnx")],
                     ["bench", str(path), "--runs", "1", "--warmup", "0", "--min-time", "0", "--threads", "1"],
                     ["flops", str(path)],
                     ["--teacher", str(path), "--budget", "2x", "--data", "digits", "--out", str(out / "run")],
                     ["distill", "--teacher", str(path), "--student", "resnet8", "--data", "digits",
                      "-o", str(out / "s.pt")]):
            result = cli(*args)
            assert result.exit_code == 2, (path.name, args[0], result.output)
            assert message in one_line(result.output), (path.name, args[0])
        with pytest.raises(UserError) as err:  # the same file given as a training state (--resume)
            load_state(path)
        assert "\n" not in str(err.value), path.name
        assert not marker.exists(), path.name
    assert not any(out.iterdir())
    assert len(cases) == 22


def test_checkpoint_fuzz_mutated_zip_and_legacy_files_are_read_or_refused(tmp_path):
    good = write_digits_checkpoint(tmp_path / "good.pt")
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(good, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    inputs = _mutations(good.read_bytes(), 11, 40) + _mutations(legacy.read_bytes(), 12, 40)
    rng = random.Random(13)
    inputs += [rng.randbytes(rng.randint(0, 2000)) for _ in range(10)]
    refused = 0
    for i, data in enumerate(inputs):
        path = tmp_path / f"{i}.pt"
        path.write_bytes(data)
        try:
            load_model(path)
        except UserError as err:
            assert "\n" not in str(err), i
            refused += 1
        path.unlink()
    assert refused >= len(inputs) * 3 // 4


# --- CIFAR pickles ------------------------------------------------------------------------------
def test_cifar_batches_that_run_code_or_lie_are_refused_and_run_nothing(tmp_path):
    from compressor.data import load_source
    from tests.fake_data import py2_pickle, write_cifar

    marker = tmp_path / "pwned"
    rows = np.zeros((2, 3072), dtype=np.uint8)
    lying = py2_pickle({b"labels": [0, 1], b"data": rows}).replace(struct.pack("<i", 2 * 3072), struct.pack("<i", 8 * 3072), 1)
    cases = {
        "os.system": pickle.dumps({"labels": [0], "data": _Call(os.system, f"touch {marker}")}),
        "builtins.exec": pickle.dumps({"labels": [_Call(exec, f"open({str(marker)!r}, 'w')")], "data": rows}),
        "object array": pickle.dumps({"labels": np.array([_Call(os.system, f"touch {marker}")], dtype=object),
                                      "data": rows}),
        "nested": py2_pickle({b"labels": [0, 1], b"data": rows, b"x": [{b"y": (_Call(eval, "1"),)}]}),
        "array larger than its bytes": lying,
        "not a dict": pickle.dumps([rows]),
    }
    for name, data in cases.items():
        root = write_cifar(tmp_path / name.replace(" ", "-"), kind="cifar10", per_class_train=1)
        (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(data)
        with pytest.raises(UserError, match="data_batch_2") as err:
            load_source(f"cifar10:{root}")
        assert "\n" not in str(err.value) and not marker.exists(), name


def test_cifar_fuzz_random_and_mutated_pickles_are_read_or_refused(tmp_path):
    from compressor.data.cifar import read_batch
    from tests.fake_data import py2_pickle

    rows = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"b1", b"labels": [0, 1, 2, 3], b"data": rows, b"filenames": [b"a.png"] * 4}
    valid = [py2_pickle(batch), pickle.dumps(batch, protocol=2), pickle.dumps(batch, protocol=4)]
    rng = random.Random(21)
    inputs = [rng.randbytes(rng.randint(0, 500)) for _ in range(20)]
    for seed, data in enumerate(valid):
        inputs += _mutations(data, 30 + seed, 25, keep=2)
    path = tmp_path / "data_batch_1"
    refused = 0
    for data in inputs:
        path.write_bytes(data)
        try:
            read_batch(path)
        except UserError as err:
            assert "\n" not in str(err)
            refused += 1
    assert refused >= 20


# --- IDX files ----------------------------------------------------------------------------------
def test_idx_files_with_lying_headers_or_gzip_bombs_are_refused_without_inflating_them(tmp_path):
    import tracemalloc

    from compressor.data.idx import IMAGES_MAGIC, read_idx

    huge = struct.pack(">IIII", IMAGES_MAGIC, 2**31 - 1, 2**31 - 1, 2**31 - 1)
    small = struct.pack(">IIII", IMAGES_MAGIC, 10, 28, 28)
    bomb = bytes(64 << 20)  # 64 MiB of zeros: 64 KiB compressed
    cases = {
        "huge-header.idx": (huge + bytes(100), "truncated"),
        "huge-header.gz": (gzip.compress(huge + bytes(100)), "more than the 4 GiB"),
        "bomb-claimed.gz": (gzip.compress(huge + bomb, compresslevel=1), "more than the 4 GiB"),
        "bomb-unclaimed.gz": (gzip.compress(small + bomb, compresslevel=1), "longer than its header says"),
        "bomb-not-idx.gz": (gzip.compress(b"\x12\x34\x56\x78" + bomb, compresslevel=1), "IDX magic number 0x12345678"),
        "short.gz": (gzip.compress(small + bytes(100)), "truncated"),
        "not-gzip.gz": (b"\x1f\x8b" + bytes(50), "corrupt .gz"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(UserError, match=message) as err:
                read_idx(tmp_path / name, IMAGES_MAGIC)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value), name
        assert peak < 8 << 20, (name, peak)  # the 64 MiB inside a bomb is never inflated


def test_idx_fuzz_random_and_mutated_files_are_read_or_refused(tmp_path):
    from compressor.data.idx import IMAGES_MAGIC, LABELS_MAGIC, encode_idx, read_idx

    images = encode_idx(np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    labels = encode_idx(np.arange(5, dtype=np.uint8))
    rng = random.Random(41)
    inputs = [(rng.randbytes(rng.randint(0, 300)), IMAGES_MAGIC, False) for _ in range(20)]
    inputs += [(d, IMAGES_MAGIC, False) for d in _mutations(images, 42, 25)]
    inputs += [(d, LABELS_MAGIC, False) for d in _mutations(labels, 43, 15)]
    inputs += [(d, IMAGES_MAGIC, True) for d in _mutations(gzip.compress(images), 44, 25, keep=2)]
    refused = 0
    for i, (data, magic, gz) in enumerate(inputs):
        path = tmp_path / (f"{i}.gz" if gz else f"{i}.idx")
        path.write_bytes(data)
        try:
            read_idx(path, magic)
        except UserError as err:
            assert "\n" not in str(err)
            refused += 1
    assert refused >= len(inputs) * 3 // 4


def test_onnx_fuzz_mutated_models_are_read_or_refused_by_what_bench_reads(tmp_path):
    """bench reads an ONNX file through kind_of, its input check, its metadata and an onnxruntime
    session: damaged copies of a small convolutional model with our metadata either pass all four
    or are refused with one line."""
    from onnx import TensorProto, helper

    from export.io import kind_of
    from export.latency import fixed_batch, onnx_input_shape
    from export.metadata import read_metadata, write_metadata
    from export.runtime import make_session
    from recipes.deploy import metadata_from_model_meta

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.linspace(-1, 1, 36).tolist())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [weight])
    proto = write_metadata(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                           metadata_from_model_meta(digits_meta()))
    valid = proto.SerializeToString()
    inputs = _mutations(valid, 51, 60)
    refused = 0
    for i, data in enumerate(inputs):
        path = tmp_path / f"{i}.onnx"
        path.write_bytes(data)
        try:
            if kind_of(path) != "onnx":
                continue  # taken for a checkpoint: the checkpoint fuzz covers that reader
            fixed_batch(path)
            read_metadata(path)
            onnx_input_shape(path)
            make_session(path, threads=1)
        except UserError as err:
            assert "\n" not in str(err), i
            refused += 1
    assert refused >= 20
    ok = tmp_path / "ok.onnx"  # the undamaged model passes every step
    ok.write_bytes(valid)
    assert kind_of(ok) == "onnx" and fixed_batch(ok) is None and onnx_input_shape(ok) == (1, 8, 8)
    assert read_metadata(ok).in_chans == 1 and make_session(ok, threads=1).get_inputs()[0].name == "x"


def test_checkpoint_meta_fuzz_every_field_with_wrong_values_is_read_or_refused(tmp_path):
    good = torch.load(write_digits_checkpoint(tmp_path / "good.pt"), weights_only=True)
    values = ["x", -1, 0, None, [1], {"a": 1}, 1.5, True, 10**6, "", [8, 8], [-1, 8]]
    path = tmp_path / "m.pt"
    refused = 0
    for field in good["meta"]:
        for value in values:
            torch.save({**good, "meta": {**good["meta"], field: value}}, path)
            try:
                load_model(path)
            except UserError as err:
                assert "\n" not in str(err), (field, value)
                refused += 1
    assert refused >= 60  # arch, num_classes, in_chans and arch_kwargs are refused in most forms
