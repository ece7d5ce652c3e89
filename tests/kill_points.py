"""Run the ``kdcompress`` command in this process and SIGKILL it at a chosen point inside a phase.

    python -m tests.kill_points --count counts.json -- ARGS...        count each phase's calls, no kill
    python -m tests.kill_points --phase export --at 1234 -- ARGS...   SIGKILL at the 1234th call of export

A point is the N-th Python or builtin function call made while the run is in the phase: every
place a SIGKILL can land between two calls, inside the trainer's steps, between ``mkstemp`` and
``os.replace``, in the middle of ``torch.save`` writing its records. The phases are the ones the
main command names through :data:`recipes.journal.PHASE_HOOKS` (``plan``, ``stage:<name>``,
``student``, ``export``, ``latency``, ``report``), and ``int8``: the time spent inside
:func:`export.pipeline.quantize_model`, within ``export``. All of it lives here, in the test's
process: production code only calls an empty hook list.

The profiler that counts runs only inside the chosen phase (``--count`` runs it throughout).
A call number beyond the phase's calls in this run (a resumed phase can make fewer) kills the run
as it leaves the phase. Before the kill one line goes to stderr (the process's own, even while the
exporter points fd 2 elsewhere): ``kill_points: SIGKILL in PHASE at call N of FUNCTION``, which
the tests read back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

INT8_CODE = ("quantize_model", os.path.join("export", "pipeline.py"))

# keys whose values are timings (or hold them): the only figures allowed to differ
TIMINGS = frozenset({"seconds", "latency", "time_s", "train_time_s", "images_per_s", "export_seconds"})
# files that hold timings: compared by their figures, not their bytes
TIMED_FILES = ("report.json", "report.md", "run.json", "plots/teacher_vs_student.png")


class _Points:
    def __init__(self, target: str | None, at: int, trace: str | None = None) -> None:
        self.target, self.at = target, at
        self.trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - open for the run
        self.phase = "start"
        self.counts: Counter[str] = Counter()
        self.outer: str | None = None  # the phase int8 interrupts (export)
        self.stderr = os.dup(2)  # the exporter points fd 2 at /dev/null while it works

    def enter(self, phase: str) -> None:
        if self.target is not None and self.phase == self.target and phase != self.target:
            self.kill(f"the end of {self.target} (it made {self.counts[self.target]} calls)")
        self.phase = phase
        if self.trace is not None:
            self.trace.write(f"{time.time():.3f}\t{phase}\n")
        if self.target is not None:  # the profiler runs only where it counts (int8 is found inside export)
            sys.setprofile(self.profile if phase in (self.target, "export" if self.target == "int8" else None)
                           else None)

    def profile(self, frame, event: str, arg) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_name == INT8_CODE[0] and code.co_filename.endswith(INT8_CODE[1]):
                self.outer = self.phase
                self.enter("int8")
        elif event == "return" and self.phase == "int8" and frame.f_code.co_name == INT8_CODE[0] \
                and frame.f_code.co_filename.endswith(INT8_CODE[1]):
            self.enter(self.outer or "export")
            return
        if event not in ("call", "c_call"):
            return
        self.counts[self.phase] += 1
        if self.phase == self.target and self.counts[self.phase] >= self.at:
            name = getattr(arg, "__qualname__", None) if event == "c_call" else frame.f_code.co_qualname
            self.kill(f"call {self.at} of {name}")

    def kill(self, where: str) -> None:
        sys.setprofile(None)
        os.write(self.stderr, f"\nkill_points: SIGKILL in {self.phase} at {where}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


# --- what a killed and resumed run folder must hold -------------------------------------------
def incomplete_files(folder: Path) -> list[str]:
    """Files at a final name in a run folder that do not read back whole (temporaries and the lock aside)."""
    import onnx
    import torch
    import yaml
    from PIL import Image

    from compressor.atomic import is_temporary
    from compressor.checkpoint import check_zip_integrity
    from compressor.lock import LOCK_NAME

    bad = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_temporary(path.name) or path.name == LOCK_NAME:
            continue
        try:
            if path.suffix == ".pt":
                check_zip_integrity(path)
                torch.load(path, weights_only=True)
            elif path.suffix == ".onnx":
                onnx.checker.check_model(onnx.load(str(path)))
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                text = path.read_text()
                assert text.endswith("\n")
                for line in text.splitlines():
                    json.loads(line)
            elif path.suffix == ".yaml":
                assert isinstance(yaml.safe_load(path.read_text()), dict)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".md":
                assert path.read_text().endswith("\n")
            else:
                raise AssertionError("a file no run writes")
        except Exception as err:  # noqa: BLE001 - any failure to read it back is the finding
            bad.append(f"{path.relative_to(folder)}: {type(err).__name__}: {err}"[:300])
    return bad


def timeless(value):
    """``value`` without its timings (a summary line's "0.026 ms" and "(0.77x)" figures masked)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    if isinstance(value, str):
        return _MS.sub("<ms>", value)
    return value


_MS = re.compile(r"\d+(\.\d+)?\s*ms\b|\(\d+(\.\d+)?x\)")


def timeless_markdown(text: str) -> list[str]:
    """report.md's lines without timings: a table's first row is its header, and the columns it
    names latency are masked below it; a row or a line that names latency is dropped."""
    out: list[str] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            if "latency" not in line:
                out.append(_MS.sub("<ms>", line))
            continue
        cells = line.split("|")
        if header is None:
            header = cells
        elif "latency" in line.lower():
            continue
        else:
            cells = ["<t>" if i < len(header) and "latency" in header[i].lower() else c for i, c in enumerate(cells)]
        out.append(_MS.sub("<ms>", "|".join(cells)))
    return out


def differences(reference: Path, resumed: Path) -> list[str]:
    """What differs between two run folders: bytes for untimed files, figures for the rest."""
    import torch

    from compressor.atomic import is_temporary

    def files(folder: Path) -> set[str]:
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

    found = []
    ref, res = files(reference), files(resumed)
    if ref != res:
        found.append(f"files: only in the reference {sorted(ref - res)}, only in the resumed run {sorted(res - ref)}")
    found += [f"{name}: a temporary left behind" for name in sorted(res) if is_temporary(Path(name).name)]
    for name in sorted(ref & res):
        a, b = reference / name, resumed / name
        if name.endswith(".pt"):
            sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            if name.endswith("state.pt") or name.endswith("student.pt") or name.endswith("model.pt"):
                found += [f"{name}: tensor {k}" for k in _tensor_differences(sa, sb)]
            if not name.endswith("state.pt") and a.read_bytes() != b.read_bytes():
                found.append(f"{name}: bytes")
            if name.endswith("state.pt") and timeless(sa["history"]) != timeless(sb["history"]):
                found.append(f"{name}: history")
        elif name.endswith(".jsonl"):
            read = [timeless(json.loads(line)) for line in a.read_text().splitlines()]
            if read != [timeless(json.loads(line)) for line in b.read_text().splitlines()]:
                found.append(f"{name}: records")
        elif name.endswith(".json"):
            if timeless(json.loads(a.read_text())) != timeless(json.loads(b.read_text())):
                found.append(f"{name}: figures")
        elif name == "report.md":
            keep = [timeless_markdown(f.read_text()) for f in (a, b)]
            if keep[0] != keep[1]:
                found.append(f"{name}: lines")
        elif name not in TIMED_FILES and a.read_bytes() != b.read_bytes():
            found.append(f"{name}: bytes")
    return found


def _tensor_differences(a, b, prefix: str = "") -> list[str]:
    """Keys of the tensors that are not bit-identical in two nested containers."""
    import torch

    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [prefix]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{prefix}/{k}" for k in a.keys() ^ b.keys()]
        for k in a.keys() & b.keys():
            if k not in TIMINGS and k != "history":
                out += _tensor_differences(a[k], b[k], f"{prefix}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensor_differences(x, y, f"{prefix}[{i}]")]
    return []


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase")
    parser.add_argument("--at", type=int, default=1)
    parser.add_argument("--count")
    parser.add_argument("--trace", help="append 'time<TAB>phase' for each phase entered (no profiler)")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from recipes.cli import cli
    from recipes.journal import PHASE_HOOKS

    points = _Points(args.phase, args.at, args.trace)
    PHASE_HOOKS.append(points.enter)
    code = 0
    if args.count:
        sys.setprofile(points.profile)
    try:
        cli.main(args=rest, prog_name="kdcompress", standalone_mode=True)
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    finally:
        sys.setprofile(None)
        if args.phase is None:
            points.enter("end")
    if args.phase is not None and args.phase == points.phase:  # the last phase: killed as the run ends
        points.kill(f"the end of the run (it made {points.counts[args.phase]} calls)")
    if args.count:
        with open(args.count, "w") as fh:
            json.dump(dict(points.counts), fh)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
