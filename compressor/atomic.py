"""Nothing is written half: every file goes to a hidden temporary name beside its destination,
and is renamed over it only once complete. A failure removes the temporary file and leaves
whatever the user had.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    from compressor.errors import UserError

    dest = Path(path)
    if dest.is_dir():
        raise UserError(f"{dest} is a directory: give a file name inside it, e.g. {dest / 'student.onnx'}")
    if make_parents:
        dest.parent.mkdir(parents=True, exist_ok=True)
    elif not dest.parent.exists():
        raise UserError(f"folder {dest.parent} does not exist: create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual mode
        os.replace(tmp_path, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
