"""Start-up cost of each runtime: model load time, first-inference time and peak resident memory.

What onnxruntime's own perf tool (``onnxruntime_perf_test``) prints beside its latencies
("Session creation time cost", "First inference time cost", "Peak working set size"), for every
runtime ``kdcompress bench`` times:
  * load: creating the onnxruntime session (graph optimisation included) from the file; for
    PyTorch eager, reading the checkpoint into a module (``compressor.checkpoint.load_model``) and
    moving it to the device;
  * first inference: the first forward of a seeded batch right after the load, which pays the
    one-off costs (allocations, kernel selection, lazy initialisation) that latency's warm-up hides;
  * peak RSS: the process's high-water mark of resident memory (Linux ``VmHWM``; ``ru_maxrss``
    elsewhere), beside its resident memory before the load (the interpreter and the runtime's
    libraries), so the model's own share shows too.
Each runtime runs in its own fresh child process (``export/startup_child.py``, ``python -I``), so
one runtime's memory cannot mask another's and neither carries the parent's (the parent holds torch
and the other runtime; an onnxruntime child never imports torch). One child per runtime, at batch 1 (or
the batch an ONNX file is fixed at) and the first thread count benchmarked; times are wall-clock on a
possibly busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from compressor.errors import UserError

CHILD_SOURCE = Path(__file__).with_name("startup_child.py")
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("onnxruntime", "pytorch")


@dataclass
class StartupStats:
    """Start-up figures of one runtime; None where the runtime does not report one (device runners)."""

    label: str
    backend: str  # "onnxruntime" or "pytorch" here; a device runner's kind in export/device_kit.py
    provider: str
    batch: int | None
    threads: int | None
    load_ms: float | None
    first_ms: float | None
    peak_rss_mb: float | None  # MiB: the process's high-water mark
    base_rss_mb: float | None = None  # MiB: resident before the model was loaded (None where /proc is missing)
    model_rss_mb: float | None = None  # MiB: what loading and one run of the model added (peak - base here)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Runtime:
    """One runtime to start: an ONNX file in onnxruntime or a checkpoint in PyTorch eager."""

    label: str
    backend: str
    path: str
    provider: str | None = None  # onnxruntime: the execution provider; pytorch: "cpu" / "cuda"
    arch: str | None = None
    trust: bool = False
    loader: str | None = None  # pytorch: "module:function" that reads the checkpoint into a LoadedModel-like (.model)
    preload: tuple[str, ...] = ()  # pytorch: modules imported before the clock (the model code's library)


def measure_startup(runtime: Runtime, input_shape: Sequence[int], *, threads: int, batch: int = 1,
                    timeout: float = 600.0) -> StartupStats:
    """Load, first inference and peak RSS of ``runtime`` in a fresh child process."""
    if runtime.backend not in BACKENDS:
        raise UserError(f"unknown runtime {runtime.backend!r}: choose {', '.join(BACKENDS)}")
    if runtime.backend == "pytorch" and not runtime.loader:
        raise UserError(f"the pytorch runtime {runtime.label} needs a checkpoint loader ('module:function')")
    providers = [runtime.provider or "CPUExecutionProvider"]
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    device = "cuda" if runtime.provider in ("cuda", "CUDAExecutionProvider") else "cpu"
    request = {"root": str(ROOT), "backend": runtime.backend, "path": str(Path(runtime.path).resolve()),
               "input_shape": [int(d) for d in input_shape], "batch": int(batch), "threads": int(threads),
               "providers": providers, "device": device, "arch": runtime.arch, "trust": runtime.trust,
               "loader": runtime.loader, "preload": list(runtime.preload)}
    done = subprocess.run([sys.executable, "-I", "-c", CHILD_SOURCE.read_text(), json.dumps(request)],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"start-up probe of {runtime.label} ({runtime.backend}) failed: {detail}")
    if "error" in result:
        raise UserError(result["error"])
    mib = 1024 * 1024
    peak = result["peak_rss_bytes"] / mib
    base = None if result["base_rss_bytes"] is None else result["base_rss_bytes"] / mib
    return StartupStats(label=runtime.label, backend=runtime.backend, provider=result["provider"], batch=batch,
                        threads=threads, load_ms=result["load_ms"], first_ms=result["first_ms"], peak_rss_mb=peak,
                        base_rss_mb=base, model_rss_mb=None if base is None else peak - base)


def startup_of(runtimes: Sequence[Runtime], input_shape: Sequence[int], *, threads: int,
               batch: int = 1) -> tuple[list[StartupStats], list[str]]:
    """(figures, notes): one child per runtime, one after the other (never two at once: they would
    share the cores). A runtime whose child fails (e.g. an architecture registered only in this
    process, which a fresh interpreter cannot build) gets a note instead of its figures: start-up
    figures are extras beside the latency table, not a reason to lose it."""
    stats, notes = [], []
    for runtime in runtimes:
        try:
            stats.append(measure_startup(runtime, input_shape, threads=threads, batch=batch))
        except (UserError, RuntimeError, subprocess.TimeoutExpired) as err:
            notes.append(f"no start-up figures for {runtime.label} ({runtime.backend}): {err}")
    return stats, notes


def bench_runtimes(onnx_models: dict[str, str], checkpoint: str | None, *, provider: str | None = None,
                   torch_device: str | None = None, arch: str | None = None, trust: bool = False,
                   loader: str | None = None, preload: Sequence[str] = ()) -> list[Runtime]:
    """The runtimes a bench run times: each labelled ONNX file, and the eager checkpoint if there is
    one (read by ``loader``, which the caller names: export never loads checkpoints itself)."""
    runtimes = [Runtime(label, "onnxruntime", str(path), provider) for label, path in onnx_models.items()]
    if checkpoint is not None:
        runtimes.insert(0, Runtime("eager", "pytorch", str(checkpoint), torch_device, arch, trust, loader,
                                   tuple(preload)))
    return runtimes


def startup_table(rows: Sequence[StartupStats]) -> str:
    """The start-up figures as a small aligned table (printed under the latency table)."""
    def cell(value, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    header = ("model", "backend", "batch", "thr", "load ms", "first ms", "peak RSS", "RSS before load", "added by model")
    body = [header] + [(
        r.label, r.backend, cell(r.batch), cell(r.threads), cell(r.load_ms, ".1f"), cell(r.first_ms, ".2f"),
        cell(r.peak_rss_mb, ".1f"), cell(r.base_rss_mb, ".1f"), cell(r.model_rss_mb, ".1f"),
    ) for r in rows]
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
