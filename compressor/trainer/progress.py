"""What a run shows and records while it trains: a tqdm bar per epoch and a JSONL line per epoch.

The bar goes to stderr (stdout stays for results) and only on rank 0; ``auto`` shows it only
when stderr is a terminal, so logs and CI output stay clean. The JSONL file gets one line per
finished epoch; on resume it is rewritten from the state's history first, so it never holds an
epoch twice or an epoch the state does not know. A fresh run replaces an earlier log only with
its own first epoch (never with an empty file first), and a write the disk refuses leaves the
log as it was: the rewrite is atomic and a failed append is cut back to its earlier length.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from compressor.atomic import atomic_output, cannot_write


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), sort_keys=False, separators=(",", ":"))


class JsonlLog:
    """Append-only per-epoch log; a no-op when ``path`` is None (e.g. on ranks other than 0)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        if self.path is None:
            return
        with atomic_output(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(json_line(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        data = (json_line(record) + "\n").encode("utf-8")
        try:
            with open(self.path, "ab", buffering=0) as fh:  # unbuffered: a failed write leaves nothing pending
                size = fh.seek(0, os.SEEK_END)
                try:
                    while data:
                        data = data[fh.write(data):]
                    os.fsync(fh.fileno())
                except OSError:  # a full disk: no half line left behind
                    with contextlib.suppress(OSError):
                        fh.truncate(size)
                    raise
        except OSError as err:
            raise cannot_write(err, self.path) or err from None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def show_bar(mode: str, is_main: bool) -> bool:
    if not is_main or mode == "off":
        return False
    return mode == "on" or sys.stderr.isatty()


def epoch_bar(total: int, epoch: int, epochs: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", file=sys.stderr,
                disable=not enabled, leave=False, dynamic_ncols=True)
