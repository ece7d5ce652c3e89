"""The main command's output folder: which files in it are ours, who is writing it, and how a
run is replaced without losing the one before.

A run writes only the names below; anything else in the folder is the user's, so a folder that
holds such a file is refused (``--force`` included) rather than written into or emptied. While a
run writes, it holds the folder's lock (:mod:`compressor.lock`); a second command is refused
with the holder's pid and command line.

``--force`` over an earlier run moves that run's files into ``.previous-run/`` and deletes them
only once the new run has finished its first stage: a new run that fails before then (a bad
setting that diverges at once, a full disk) is removed and the earlier run put back. A new run
stopped by Ctrl-C or killed is left to be resumed; the earlier run then stays in ``.previous-run/``
until the new one (``--resume``) finishes a stage, or a later ``--force`` run fails early and puts it back.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from compressor.atomic import is_temporary, remove_stale_temporaries
from compressor.errors import UserError
from compressor.lock import LOCK_NAME, check_free, folder_lock, hold

RUN_FILES = ("plan.yaml", "run.json", "report.json", "report.md", "student.pt", "student.onnx", "student.int8.onnx")
# stages/<stage>/ (recipes.runner): model.pt, state.pt, log.jsonl, and a phase's own state.<phase>.pt and
# log.<phase>.jsonl (the trainer's init phase)
STAGE_FILE = re.compile(r"(?:model|state)(?:\.\w+)?\.pt|log(?:\.\w+)?\.jsonl")
PREVIOUS = ".previous-run"
RUN_MARKERS = ("plan.yaml", "report.json", "stages", PREVIOUS)


def target_files() -> list[str]:
    """The student's files of every export target (``--target``): student.pte, student.xml, ..."""
    from export.targets import get_target, path_for, target_names

    return [p.name for t in map(get_target, target_names()) for p in t.paths(path_for("student.onnx", t))]


def foreign_files(folder: Path) -> list[Path]:
    """Files and folders in ``folder`` that no run of ours writes (its own files are listed above)."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if is_temporary(name) or (entry.is_file() and name in (*RUN_FILES, *target_files(), LOCK_NAME)) or \
                (entry.is_dir() and name == PREVIOUS):
            continue
        if entry.is_dir() and name == "plots":
            found += [p for p in sorted(entry.iterdir()) if not (p.is_file() and (p.suffix == ".png" or is_temporary(p.name)))]
        elif entry.is_dir() and name == "stages":
            for stage in sorted(entry.iterdir()):
                if not stage.is_dir():
                    found.append(stage)
                    continue
                found += [p for p in sorted(stage.iterdir())
                          if not (p.is_file() and (STAGE_FILE.fullmatch(p.name) or is_temporary(p.name)))]
        else:
            found.append(entry)
    return found


class RunFolder:
    """``--out``: checked before planning, claimed (locked) once there is a plan to write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = folder_lock(self.path)

    def has_plan(self) -> bool:
        """A run that got as far as writing its plan (a run killed while planning recorded nothing)."""
        return (self.path / "plan.yaml").is_file()

    def holds_run(self) -> bool:
        return self.path.is_dir() and any((self.path / m).exists() for m in RUN_MARKERS)

    def check(self, *, resume: bool, force: bool) -> bool:
        """Refuse what must not be written into; True when ``--force`` will replace a run."""
        check_free(self.lock, self.path)
        return self._check_contents(resume=resume, force=force)

    def _check_contents(self, *, resume: bool, force: bool) -> bool:
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder: choose a folder name")
        if resume:
            if not self.has_plan():
                raise UserError(f"{out} holds no run to resume (no plan.yaml: a run stopped while planning records "
                                "nothing); run its command again (with its --teacher and --budget, --resume starts it)")
            return False
        foreign = foreign_files(out)
        if foreign:
            more = f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise UserError(f"{out} holds {foreign[0].relative_to(out)}{more}, which is not part of a kdcompress "
                            "run; nothing there is replaced or removed: choose an empty or new --out")
        holds_run = self.holds_run()
        if holds_run and not force:
            kept = (f" (the run it was replacing is kept in {out / PREVIOUS})"
                    if (out / PREVIOUS).is_dir() else "")
            raise UserError(f"{out} holds another run{kept}: pass --resume {out} to continue it, --force to "
                            "replace it, or choose another --out")
        return holds_run

    @contextlib.contextmanager
    def claim(self, *, resume: bool, force: bool) -> Iterator[Callable[[Any], None]]:
        """Lock the folder for the block, check it again under the lock, clear stale temporaries and
        set an earlier run aside when replacing. Yields the callback a finished stage calls."""
        with hold(self.lock, self.path):
            replace = self._check_contents(resume=resume, force=force)  # another run may have ended meanwhile
            remove_stale_temporaries(self.path, recursive=True)
            if replace:
                self._set_aside()
            stage_done = False

            def first_stage_done(_stage: Any = None) -> None:
                nonlocal stage_done
                if not stage_done:
                    stage_done = True
                    shutil.rmtree(self.path / PREVIOUS, ignore_errors=True)

            try:
                yield first_stage_done
            except Exception:  # not Ctrl-C: an interrupted run stays, to be resumed, like a killed one
                if replace and not stage_done:
                    self._put_back()
                raise

    def _own_entries(self) -> list[Path]:
        return [e for e in self.path.iterdir() if e.name not in (LOCK_NAME, PREVIOUS)]

    def _set_aside(self) -> None:
        """Move the earlier run into PREVIOUS; a run already there (a replacement was killed before
        it finished a stage) is the one to keep, and the unfinished one is dropped."""
        previous = self.path / PREVIOUS
        keep = not previous.is_dir()
        previous.mkdir(exist_ok=True)
        for entry in self._own_entries():
            if keep:
                entry.rename(previous / entry.name)
            else:
                _remove(entry)

    def _put_back(self) -> None:
        for entry in self._own_entries():
            _remove(entry)
        previous = self.path / PREVIOUS
        for entry in previous.iterdir():
            entry.rename(self.path / entry.name)
        previous.rmdir()


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
