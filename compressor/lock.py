"""One writer per output: an advisory lock file that names the process holding it.

Two commands writing the same run folder (or the same ``-o`` checkpoint) at once would interleave
their logs and leave the last one's files. Each run therefore holds ``fcntl.flock`` on a lock file
for as long as it writes: a folder's is ``FOLDER/.kdcompress.lock``, a file's is ``.NAME.lock``
beside it. The file records the holder (pid, start time, command) so the refusal can name it.

The kernel drops a flock when its process ends, however it ends: a killed run leaves at most a
stale file whose lock nobody holds, and the next run takes it over (and rewrites the record).
The holder removes the file when it is done; a run that opened the file just before that removal
sees a different inode at the path once it holds the lock, and tries again on the new file.
Under torchrun only global rank 0 writes files, so only it takes the lock. Where ``fcntl`` does
not exist (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator

from compressor.atomic import cannot_write
from compressor.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".kdcompress.lock"
_ATTEMPTS = 10  # a lock busy for a moment (another run's check, or its release) is tried again
_PAUSE_S = 0.05


def folder_lock(folder: str | os.PathLike) -> Path:
    """The lock of a run folder (the main command's ``--out``): inside it."""
    return Path(folder) / LOCK_NAME


def file_lock(path: str | os.PathLike) -> Path:
    """The lock of an output file (``train``/``distill -o``): hidden, beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def check_free(lock: Path, what: str | os.PathLike) -> None:
    """Refuse, naming the holder, if a live process holds ``lock``; writes nothing."""
    if fcntl is None or not _is_writer() or not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        _try_lock(fd, lock, what, shared=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(lock: Path, what: str | os.PathLike) -> Iterator[None]:
    """Hold ``lock`` for the block (its folder is created); a UserError naming the holder if taken."""
    if fcntl is None or not _is_writer():
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, what)
    except OSError as err:  # a read-only or full file system: nothing can be written there
        raise cannot_write(err, what) or err from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock):
                lock.unlink()
        os.close(fd)  # releases the lock


def _acquire(lock: Path, what: str | os.PathLike) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _try_lock(fd, lock, what, shared=False)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):  # not removed by a holder that finished while we waited
            record = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command()}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
            except OSError:  # a full disk: leave no empty lock file behind
                with contextlib.suppress(OSError):
                    lock.unlink()
                os.close(fd)
                raise
            return fd
        os.close(fd)


def _try_lock(fd: int, lock: Path, what: str | os.PathLike, *, shared: bool) -> None:
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    for attempt in range(_ATTEMPTS):
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError:
            if attempt + 1 < _ATTEMPTS:
                time.sleep(_PAUSE_S)
        except OSError:  # a file system without locks: run unlocked rather than not at all
            return
    raise UserError(f"{what} is being written by another kdcompress process ({_holder(lock)}); "
                    "wait for it to finish or choose another output")


def _holder(lock: Path) -> str:
    try:
        record = json.loads(lock.read_text())
        return f"pid {int(record['pid'])}: {record['command']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its record is not written yet"


def _same_file(fd: int, lock: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(lock)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _command() -> str:
    """This process's command line as a user would type it (``python -m recipes.cli ...``, ``kdcompress ...``)."""
    argv = list(sys.argv) or [""]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    python = Path(sys.executable).name
    if spec is not None and spec.name:
        head = [python, "-m", spec.name.removesuffix(".__main__")]
    elif argv[0] in ("", "-c"):
        head = [python, argv[0]] if argv[0] else [python]
    else:
        head = [Path(argv[0]).name]
    text = shlex.join([*head, *argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."


def _is_writer() -> bool:
    """Under torchrun every rank runs the command; only global rank 0 writes files."""
    return os.environ.get("RANK", "0") == "0"
