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
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compressor.checkpoint import ModelMeta, load_model, save_model
from compressor.errors import UserError
from compressor.models import create


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


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
        assert message in _one_line(result.output), args
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
    assert result.exit_code == 2 and "not valid YAML" in _one_line(result.output)
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
        assert message in _one_line(result.output), path
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
    assert "val/cat/0.png" in _one_line(result.output)  # no epoch line: refused before training
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
