"""Nothing is written half: every file goes to a hidden temporary name beside its destination,
and is renamed over it only once complete. A failure removes the temporary file and leaves
whatever the user had.

A process killed mid-write (SIGKILL, power loss) cannot clean up, so the temporary names carry
the writer's pid: ``.NAME.PID.XXXXXXXX.tmp`` (export's simplified candidate adds ``.simplified``).
The next write of the same target, and :func:`remove_stale_temporaries` at the start of a run,
delete those whose process is gone; no other file matches the pattern, and a live writer's
temporary is left alone.

A write the file system refuses (a full disk or quota, a read-only or forbidden folder) is the
user's to fix, not a bug: :func:`cannot_write` turns it into one line naming the file, and since
the rename never happened the earlier file at that name is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from compressor.errors import UserError


# errno values that mean "this place cannot take the file": full disk or quota, read-only file system,
# no permission, file too large for the file system
CANNOT_WRITE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def cannot_write(err: OSError, path: str | os.PathLike | None = None) -> UserError | None:
    """The one-line error for a write the file system refused, naming ``path`` (else the file the
    error names); None for any other OSError, which stays a bug with its traceback."""
    if not isinstance(err, OSError) or err.errno not in CANNOT_WRITE:
        return None
    where = path if path is not None else (err.filename or "the output")
    return UserError(f"cannot write {where}: {os.strerror(err.errno)} (earlier files there are left as they were)")


def _refuse(err: OSError, path: str | os.PathLike) -> BaseException:
    return cannot_write(err, path) or err


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A full disk or a read-only folder, here or in the block, is a UserError naming ``path``."""
    dest = Path(path)
    if dest.is_dir():
        raise UserError(f"{dest} is a directory: give a file name inside it, e.g. {dest / 'student.onnx'}")
    try:
        if make_parents:
            dest.parent.mkdir(parents=True, exist_ok=True)
        elif not dest.parent.exists():
            raise UserError(f"folder {dest.parent} does not exist: create it first")
        remove_stale_temporaries(dest.parent, target=dest.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as err:
        raise _refuse(err, dest) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual mode
        os.replace(tmp_path, dest)
    except OSError as err:
        raise _refuse(err, dest) from None
    finally:
        with contextlib.suppress(OSError):  # gone already, or a file system that refuses even this
            tmp_path.unlink()


def check_writable(path: str | os.PathLike) -> None:
    """Refuse now, not after minutes of work, a file whose folder cannot take it (read-only, no
    permission, full): a one-byte temporary is written beside it, synced and removed. A folder
    that does not exist yet is left to the writer, which creates it."""
    dest = Path(path)
    if not dest.parent.is_dir():
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    except OSError as err:
        raise _refuse(err, dest) from None
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    except OSError as err:
        raise _refuse(err, dest) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


# .NAME.PID.RANDOM.tmp (PID absent in files from before it was recorded); RANDOM is mkstemp's 8 characters
_TEMPORARY = re.compile(r"\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp(?:\.simplified)?")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file name :func:`atomic_output` makes."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike, *, target: str | None = None,
                             recursive: bool = False) -> list[Path]:
    """Delete our temporaries in ``folder`` (of ``target`` only, if given) whose writer is gone."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (target is not None and match["target"] != target) or not path.is_file():
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot ask about: leave its file
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
