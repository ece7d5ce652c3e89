"""What a main-command run has been asked for and has finished beyond its stages: ``run.json``.

A killed run is resumed with ``kdcompress --resume DIR`` alone, so the folder must say what the
run was asked to deliver besides its plan (``--int8``, ``--baseline``, ``--latency-threads``) and
what it already found before training (the probe search's rows): without that record a resumed
run silently left out the int8 file and the baseline its first command asked for. The record is
written before ``plan.yaml``, so a folder that holds a plan always holds it.

The phases after the stages record their results once finished: ``export`` (the ONNX file, its
parity and the int8 comparison) and ``latency``. Each record is keyed by what the phase read (the
student's bytes, its settings) and holds the SHA-256 of every file it wrote; a resumed run reuses
a record only when both still match, and otherwise does the phase again. A finished phase is thus
never redone with other figures (the latency most of all), and a file changed since is never
trusted. ``run.json`` is replaced atomically: a kill leaves the record before or after a phase,
never half of one.

Phase marks: :func:`enter` names the phase a run is entering (``plan``, ``stage:<name>``,
``student``, ``export``, ``latency``, ``report``). It calls :data:`PHASE_HOOKS`, empty in
production, where the kill-anywhere tests hook in to stop the process at a chosen point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from compressor.atomic import write_text
from compressor.errors import UserError

JOURNAL = "run.json"
VERSION = 1
PHASE_HOOKS: list[Callable[[str], None]] = []  # called with each phase name a run enters (tests only)


def enter(phase: str) -> None:
    """Mark the start of ``phase`` (free when no hook is registered)."""
    for hook in PHASE_HOOKS:
        hook(phase)


def file_digest(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes; None when it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


class RunJournal:
    """``DIR/run.json``: the run's delivery options and its finished phases."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / JOURNAL
        self.data: dict[str, Any] = {"version": VERSION, "options": {}, "phases": {}}

    def load(self) -> "RunJournal":
        """Read the record; a run from before it existed has none (its options are the command's)."""
        if not self.path.is_file():
            return self
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("options"), dict) \
                    or not isinstance(data.get("phases"), dict):
                raise ValueError("not a run record")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.path} ({err}); it is written by kdcompress and was changed since: "
                            "delete it to redo the run's export and timing with this command's options") from None
        if data.get("version", 0) > VERSION:
            raise UserError(f"{self.path} was written by a newer kdcompress (record version {data['version']})")
        self.data = data
        return self

    def start(self, **options: Any) -> None:
        """A new run: record what it was asked for (before its plan is written)."""
        self.data = {"version": VERSION, "options": options, "phases": {}}
        self._save()

    def options(self, **given: Any) -> dict[str, Any]:
        """A resumed run's options: the recorded ones; a flag given now that asks for more (``--int8``,
        ``--baseline``) is added and recorded, so the resumed run delivers both."""
        recorded = self.data["options"]
        if not recorded:  # a run from before this record: the command's flags are all there is
            return dict(given)
        merged = {**given, **recorded}
        for flag in ("int8", "baseline"):
            merged[flag] = bool(recorded.get(flag)) or bool(given.get(flag))
        if merged != recorded:
            self.data["options"] = merged
            self._save()
        return merged

    def finished(self, phase: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded result of ``phase`` if it was finished with this ``key`` and the files it wrote are
        unchanged; else None (the phase is to be done)."""
        record = self.data["phases"].get(phase)
        if not isinstance(record, dict) or record.get("key") != _plain(key):
            return None
        files = record.get("files") or {}
        if any(file_digest(path) != digest for path, digest in files.items()):
            return None
        return record.get("result")

    def finish(self, phase: str, key: dict[str, Any], result: Any, files: Sequence[str | Path] = ()) -> Any:
        """Record ``phase`` as finished with ``result`` (JSON-plain) and its files' digests; returns the
        result as the record holds it, so a first run and a resumed one go on with the same values."""
        record = {"key": _plain(key), "result": _plain(result),
                  "files": {str(p): file_digest(p) for p in files}}
        self.data["phases"][phase] = record
        self._save()
        return record["result"]

    def once(self, phase: str, key: dict[str, Any], compute: Callable[[], Any],
             files: Sequence[str | Path] = ()) -> Any:
        """``phase``'s recorded result, or ``compute()`` recorded now (with the digests of ``files``)."""
        enter(phase)
        recorded = self.finished(phase, key)
        return recorded if recorded is not None else self.finish(phase, key, compute(), files)

    def _save(self) -> None:
        write_text(self.path, json.dumps(self.data, indent=1, default=_jsonable))


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
