"""What a path is (ONNX model or kdcompress checkpoint) and how to write a file without leaving half of it.

Every file this package produces goes through :func:`atomic_output`: the bytes are written to a
hidden temporary name in the destination folder, verified there, and only then renamed over the
destination. A failure at any point removes the temporary file and leaves whatever the user had.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

from compressor.atomic import atomic_output as _atomic_output
from compressor.errors import UserError

ONNX_SUFFIXES = (".onnx", ".ort")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`compressor.atomic.atomic_output` for a user-named file: its folder must already exist."""
    with _atomic_output(path, make_parents=False) as tmp:
        yield tmp


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True when ``path`` parses as an ONNX ModelProto with a graph (weights are not loaded)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises a zoo of types on garbage; all mean "not ONNX"
        return False
    return len(proto.graph.node) > 0 and len(proto.graph.output) > 0


def is_torch_file(path: str | os.PathLike) -> bool:
    """True for files ``torch.save`` writes: a zip archive with a ``data.pkl`` or a legacy pickle."""
    p = Path(path)
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist())
    with open(p, "rb") as fh:
        head = fh.read(2)
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def kind_of(path: str | os.PathLike) -> str:
    """``"onnx"`` or ``"checkpoint"``; anything else is a UserError naming the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not an ONNX model or a checkpoint")
    # Content decides, the suffix only orders the guesses (a protobuf parser accepts some garbage).
    checks = [("onnx", is_onnx_file), ("checkpoint", is_torch_file)]
    if p.suffix.lower() not in ONNX_SUFFIXES:
        checks.reverse()
    for kind, check in checks:
        if check(p):
            return kind
    raise UserError(f"{p} is neither an ONNX model nor a PyTorch checkpoint: give a .onnx file or a .pt checkpoint")
