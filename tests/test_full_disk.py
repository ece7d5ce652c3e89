"""Reliability (issue 18, item 3): a full disk or a read-only folder under export, train, the main
command and ``bench --json`` is one line naming the path and exit 2, and every earlier file is intact.

The full disk is simulated where every writer goes through Python's file objects: inside the
"full" folder, creating, renaming and truncating files still work (as on a real full disk: a new
inode or an empty file costs no blocks) but any write of data fails with ENOSPC. Where the
machine allows it (root with mount rights), the same runs are repeated on a real 64 KiB tmpfs and
a real read-only bind mount; as root, chmod does not stop writes, so the chmod variant runs only
for an ordinary user.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
from tests.fake_data import folder_bytes, one_line, write_digits_checkpoint
from pathlib import Path
from typing import Iterator

import pytest

from compressor.errors import UserError
from compressor.trainer.progress import JsonlLog, read_jsonl




class _FullFile:
    """A real file object whose data writes fail as on a full disk."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data) -> int:
        if len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


@contextlib.contextmanager
def _full_disk(folder: Path) -> Iterator[None]:
    """Every data write under ``folder`` fails with ENOSPC (see the module docstring)."""
    real_open = builtins.open
    inside = str(folder.resolve()) + os.sep

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+")
        if writes and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(inside):
            return _FullFile(fh)
        return fh

    real_write = os.write

    def full_write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if len(data) and target.startswith(inside):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "write", full_write)
    mp.setattr(builtins, "open", full_open)
    mp.setattr(io, "open", full_open)
    mp.setattr(shutil, "_USE_CP_SENDFILE", False)  # copies go through write() too
    try:
        yield
    finally:
        mp.undo()




def _earlier_train_files(folder: Path) -> None:
    """What an earlier ``train -o m.pt`` left: the model, its state and its per-epoch log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.pt").write_bytes(b"earlier weights")
    (folder / "m.pt.state").write_bytes(b"earlier state")
    (folder / "m.pt.jsonl").write_text('{"epoch":1,"train_loss":2.0}\n{"epoch":2,"train_loss":1.5}\n')


def _earlier_run(folder: Path) -> None:
    for rel, data in {"plan.yaml": b"data: digits\nstages: []\n", "report.json": b"{}", "student.pt": b"old",
                      "stages/old/model.pt": b"old stage", "stages/old/log.jsonl": b"{}\n"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _commands(tmp_path: Path, folder: Path) -> list[tuple[str, list[str]]]:
    """Each writing command aimed at ``folder``, which already holds that command's earlier files."""
    ckpt = write_digits_checkpoint(tmp_path / "in.pt")
    (folder / "x.onnx").write_bytes(b"earlier onnx")
    (folder / "b.json").write_text('{"earlier": true}')
    return [
        ("train", ["train", "--arch", "resnet8", "--data", "digits", "-o", str(folder / "m.pt"), "--epochs", "1",
                   "-q"]),
        ("export", ["export", str(ckpt), "-o", str(folder / "x.onnx")]),
        ("bench", ["bench", str(ckpt), "--runs", "1", "--warmup", "0", "--min-time", "0", "--threads", "1",
                   "--batch", "2", "--no-eager", "--json", str(folder / "b.json")]),
        ("main", ["--data", "digits", "--preset", _plan(tmp_path), "--out", str(folder / "run"), "--force"]),
    ]


def _plan(tmp_path: Path) -> str:
    import yaml

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"data": "digits", "stages": [
        {"name": "s1", "scheme": "vanilla", "arch": "resnet8",
         "train": {"epochs": 1, "stop_when_not_learning": False, "progress": "off"}}]}))
    return str(path)


def _check_refused(cli, tmp_path: Path, folder: Path, refuse, reason: str) -> int:
    _earlier_train_files(folder)
    _earlier_run(folder / "run")
    commands = _commands(tmp_path, folder)
    before = folder_bytes(folder)
    for name, args in commands:
        with refuse():
            result = cli(*args)
        assert result.exit_code == 2, (name, result.output)
        line = one_line(result.output)
        assert reason in line and str(folder) in line, (name, line)
        assert folder_bytes(folder) == before, name  # nothing replaced, emptied or left behind (no temporaries)
    return len(commands)


def test_a_full_disk_is_one_line_and_every_earlier_file_is_intact(cli, tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    assert _check_refused(cli, tmp_path, folder, lambda: _full_disk(folder), "No space left on device") == 4


def test_train_on_a_full_disk_keeps_the_earlier_log_until_it_has_an_epoch_of_its_own(tmp_path):
    """The log used to be emptied when a run started: a full disk at the first save then lost it."""
    log = tmp_path / "m.jsonl"
    JsonlLog(log).rewrite([{"epoch": 1}, {"epoch": 2}])
    before = log.read_bytes()
    with _full_disk(tmp_path), pytest.raises(UserError, match=f"cannot write {log}: No space"):
        JsonlLog(log).append({"epoch": 3})
    assert log.read_bytes() == before  # no half line
    with _full_disk(tmp_path), pytest.raises(UserError, match=f"cannot write {log}: No space"):
        JsonlLog(log).rewrite([{"epoch": 1}])
    assert log.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
    JsonlLog(log).append({"epoch": 3})
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2, 3]


# --- the real thing, where the machine lets us mount ----------------------------------------------
def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def _mounted(folder: Path, *args: str) -> Iterator[None]:
    if not _mount(*args, str(folder)):
        pytest.skip("cannot mount here (needs root with mount rights)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_read_only_folder(cli, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:  # an ordinary user: chmod is enough
        def refuse():
            @contextlib.contextmanager
            def locked() -> Iterator[None]:
                for path in [folder, *folder.rglob("*")]:
                    if path.is_dir():
                        path.chmod(0o555)
                try:
                    yield
                finally:
                    for path in [folder, *folder.rglob("*")]:
                        if path.is_dir():
                            path.chmod(0o755)
            return locked()
        assert _check_refused(cli, tmp_path, folder, refuse, "Permission denied") == 4
        return

    # root ignores chmod: bind-mount the folder onto itself read-only while each command runs
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("root without mount rights: chmod does not stop root's writes and no read-only mount is possible")
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)

    @contextlib.contextmanager
    def read_only() -> Iterator[None]:
        with _mounted(folder, "--bind", str(folder)):
            assert _mount("-o", "remount,bind,ro", str(folder))
            yield

    assert _check_refused(cli, tmp_path, folder, read_only, "Read-only file system") == 4


def test_a_real_full_tmpfs(cli, tmp_path):
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    with _mounted(folder, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        _earlier_train_files(folder)
        _earlier_run(folder / "run")
        commands = _commands(tmp_path, folder)
        filler = folder / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as fh:  # fill what is left
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        before = folder_bytes(folder)
        for name, args in commands:
            result = cli(*args)
            assert result.exit_code == 2, (name, result.output)
            line = one_line(result.output)
            assert "No space left on device" in line and str(folder) in line, (name, line)
            assert folder_bytes(folder) == before, name


def test_a_cost_cache_on_a_full_disk_or_damaged_is_only_a_slower_search(tmp_path):
    from compressor.cost import _DiskCache

    cache = _DiskCache(tmp_path / "cost-cache.json")
    with _full_disk(tmp_path):
        cache.put("k", {"flops": 1})  # the write fails: no error, the value is kept in memory
    assert cache.get("k") == {"flops": 1} and not (tmp_path / "cost-cache.json").exists()
    (tmp_path / "cost-cache.json").write_text("[1, 2]")  # valid JSON, not a cache
    assert _DiskCache(tmp_path / "cost-cache.json").get("k") is None
