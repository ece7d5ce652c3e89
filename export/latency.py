"""Latency of an ONNX file in onnxruntime, and of the PyTorch eager model for comparison.

Method (the same for both back ends, so their ratio means something):
  * one fixed, seeded N(0, 1) input batch, created once, outside the timed region;
  * ``warmup`` untimed runs (allocations, kernel selection, caches);
  * then timed runs, one ``perf_counter_ns`` interval per forward, until BOTH ``min_runs`` runs
    and ``min_time`` seconds are reached (``max_runs`` caps a very fast model);
  * reported: mean, p50, p90, p99 (linear interpolation), min, max, std in milliseconds per
    batch, and throughput = batch / mean, in images per second; speed-ups against eager PyTorch
    are ratios of medians (p50), which a busy shared machine disturbs far less than the mean;
  * also recorded: the median CPU time of the calling thread per forward (``cpu_p50_ms``). At
    one intra-op thread both back ends compute on the calling thread, so this is the forward's
    cost without the time the thread sat descheduled: on an overloaded machine a forward longer
    than a scheduler slice is stretched by the other processes while a short one often is not,
    which distorts wall-clock ratios; CPU-time ratios are not distorted that way;
  * onnxruntime: ``ORT_ENABLE_ALL`` graph optimisation, sequential execution, one inter-op
    thread, ``intra_op_num_threads`` = the thread count; the provider actually used is recorded;
  * PyTorch: eval mode, ``torch.inference_mode()``, ``torch.set_num_threads`` = the same count
    (restored afterwards); on CUDA every run is synchronised before the clock stops.
Thread counts: all cores of this process (its CPU affinity) and 1 (a phone app's usual setting).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from compressor.errors import UserError
from export.runtime import all_cores, available_providers, make_session

DEFAULT_WARMUP = 10
DEFAULT_MIN_RUNS = 50
DEFAULT_MIN_TIME = 1.0
DEFAULT_MAX_RUNS = 100_000


@dataclass(frozen=True)
class Timing:
    """How long to measure (shared by every back end in one benchmark)."""

    warmup: int = DEFAULT_WARMUP
    min_runs: int = DEFAULT_MIN_RUNS
    min_time: float = DEFAULT_MIN_TIME
    max_runs: int = DEFAULT_MAX_RUNS

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_runs < 1 or self.min_time < 0 or self.max_runs < self.min_runs:
            raise UserError("timing needs warmup >= 0, runs >= 1, min time >= 0 and max runs >= runs")


@dataclass
class LatencyStats:
    label: str  # what was timed, e.g. "fp32", "int8", "eager"
    backend: str  # "onnxruntime" or "pytorch"
    provider: str  # CPUExecutionProvider / CUDAExecutionProvider, or the torch device
    batch: int
    threads: int
    warmup: int
    runs: int
    total_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    throughput: float  # images per second
    cpu_p50_ms: float | None = None  # median CPU time of the calling thread (meaningful at 1 thread)
    p95_ms: float | None = None  # only where a device runner reports it (export/device_kit.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Per-call seconds of one timing loop, on two clocks."""

    wall: list[float] = field(default_factory=list)  # perf_counter: what a user waits
    cpu: list[float] = field(default_factory=list)  # CPU time of the calling thread (see module doc)


def sample(fn: Callable[[], object], timing: Timing = Timing()) -> Samples:
    """Warm-up, then timed calls of ``fn`` until both minimums (runs and seconds) are reached."""
    for _ in range(timing.warmup):
        fn()
    samples = Samples()
    start = time.perf_counter_ns()
    while True:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        fn()
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        samples.wall.append((t1 - t0) * 1e-9)
        samples.cpu.append((c1 - c0) * 1e-9)
        done_runs = len(samples.wall) >= timing.min_runs
        done_time = (t1 - start) * 1e-9 >= timing.min_time
        if (done_runs and done_time) or len(samples.wall) >= timing.max_runs:
            return samples


def measure(fn: Callable[[], object], timing: Timing = Timing()) -> list[float]:
    """Wall-clock seconds per call of ``fn`` (see :func:`sample`)."""
    return sample(fn, timing).wall


def summarize(
    times: Sequence[float], *, label: str, backend: str, provider: str, batch: int, threads: int, warmup: int,
    cpu_times: Sequence[float] | None = None,
) -> LatencyStats:
    """Statistics of per-run wall seconds; percentiles are ordered by construction (one sorted sample)."""
    ms = np.sort(np.asarray(times, dtype=np.float64) * 1e3)
    if ms.size == 0:
        raise ValueError("no timed runs")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(
        label=label,
        backend=backend,
        provider=provider,
        batch=batch,
        threads=threads,
        warmup=warmup,
        runs=int(ms.size),
        total_s=float(ms.sum() / 1e3),
        mean_ms=mean,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(ms[0]),
        max_ms=float(ms[-1]),
        std_ms=float(ms.std()),
        throughput=batch / (mean / 1e3),
        cpu_p50_ms=float(np.median(cpu_times) * 1e3) if cpu_times else None,
    )


def fixed_input(input_shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=generator)


def image_input(proto: onnx.ModelProto, path: str | os.PathLike):
    """The graph's one input, checked to be a float32 image batch (N, C, H, W): what bench feeds.

    A model that takes something else (token ids, a flat vector, two inputs) cannot be timed on
    random images; it is refused with one line instead of onnxruntime's error at the first run."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise UserError(f"{path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                        "bench times image classifiers with one image input")
    tensor = inputs[0].type.tensor_type
    elem = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "no tensor type"
    rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
    if tensor.elem_type != onnx.TensorProto.FLOAT or rank != 4:
        shown = f"rank {rank}" if rank is not None else "an unknown rank"
        raise UserError(f"{path}: input {inputs[0].name!r} is {elem} of {shown}, not a float32 image "
                        "batch (N, C, H, W); bench times image classifiers")
    return inputs[0]


def fixed_batch(path: str | os.PathLike) -> int | None:
    """The batch size an ONNX file's input is fixed at, or None where it is dynamic."""
    proto = onnx.load(str(path), load_external_data=False)
    first = image_input(proto, path).type.tensor_type.shape.dim[0]
    return int(first.dim_value) if first.HasField("dim_value") and first.dim_value > 0 else None


def onnx_input_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """(C, H, W) of an ONNX file's first input; a dynamic spatial size is taken from its metadata."""
    from export.metadata import read_metadata

    proto = onnx.load(str(path), load_external_data=False)
    dims = image_input(proto, path).type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims][1:]
    if any(d is None for d in shape):
        meta = read_metadata(proto)
        if meta.in_chans and meta.input_size:
            return (int(meta.in_chans), *map(int, meta.input_size))
        raise UserError(f"{path} has a dynamic input size and no input_size metadata: cannot pick an input")
    return tuple(int(d) for d in shape)


def onnx_runner(
    path: str | os.PathLike,
    *,
    batch: int = 1,
    threads: int | None = None,
    provider: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[Callable[[], object], str]:
    """(one forward of a fixed batch, the provider actually used) for an ONNX file."""
    threads = threads or all_cores()
    providers = [provider] if provider else available_providers()
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    session = make_session(path, threads=threads, providers=providers)
    shape = tuple(input_shape) if input_shape else onnx_input_shape(path)
    x = fixed_input(shape, batch).numpy()
    name = session.get_inputs()[0].name
    used = session.get_providers()[0]
    if used == "CUDAExecutionProvider":
        # keep the input on the GPU so the figure is the model's time, not a copy per run
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(session.get_outputs()[0].name, "cuda")

        def run_cuda() -> object:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return None

        return run_cuda, used
    feed = {name: x}
    return (lambda: session.run(None, feed)), used


@contextlib.contextmanager
def torch_runner(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Callable[[], object], str]]:
    """(one eager forward of a fixed batch, device) inside eval, inference_mode and ``threads`` threads.

    The model's mode and device and torch's thread count are restored on exit.
    """
    threads = threads or all_cores()
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    x = fixed_input(input_shape, batch).to(device)
    cuda = device.type == "cuda"
    was_training = model.training
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.eval()
    model.to(device)
    try:
        with torch.inference_mode():

            def run() -> object:
                out = model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                return out

            yield run, str(device)
    finally:
        torch.set_num_threads(saved_threads)
        model.to(model_device)
        model.train(was_training)


def bench_onnx(
    path: str | os.PathLike,
    *,
    batch: int = 1,
    threads: int | None = None,
    provider: str | None = None,
    timing: Timing = Timing(),
    label: str = "onnx",
    input_shape: Sequence[int] | None = None,
) -> LatencyStats:
    """Time one ONNX file at one batch size and thread count (None: all cores)."""
    threads = threads or all_cores()
    run, used = onnx_runner(path, batch=batch, threads=threads, provider=provider, input_shape=input_shape)
    got = sample(run, timing)
    return summarize(got.wall, label=label, backend="onnxruntime", provider=used, batch=batch,
                     threads=threads, warmup=timing.warmup, cpu_times=got.cpu)


def bench_torch(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    threads: int | None = None,
    device: str | torch.device | None = None,
    timing: Timing = Timing(),
    label: str = "eager",
) -> LatencyStats:
    """Time the eager PyTorch model (eval, inference_mode) on ``device`` (default: the model's)."""
    threads = threads or all_cores()
    with torch_runner(model, input_shape, batch=batch, threads=threads, device=device) as (run, used):
        got = sample(run, timing)
    return summarize(got.wall, label=label, backend="pytorch", provider=used, batch=batch, threads=threads,
                     warmup=timing.warmup, cpu_times=got.cpu)


def thread_counts(spec: str | Sequence[int] | None) -> list[int]:
    """``"all,1"`` -> [cores, 1]; ``None`` -> the default (all cores, then 1); duplicates removed."""
    if spec is None:
        spec = "all,1"
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    counts: list[int] = []
    for item in items:
        text = str(item).strip().lower()
        if text in ("all", ""):  # "0" is refused below: it is not a thread count
            value = all_cores()
        elif text.isdigit() and int(text) > 0:
            value = int(text)
        else:
            raise UserError(f"bad thread count {item!r}: give positive integers or 'all', e.g. --threads all,1")
        if value not in counts:
            counts.append(value)
    return counts


def machine_info() -> dict:
    """What the figures were measured on (they mean nothing without it)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": all_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "providers": available_providers(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class BenchmarkReport:
    results: list[LatencyStats] = field(default_factory=list)
    timing: Timing = Timing()
    machine: dict = field(default_factory=machine_info)
    notes: list[str] = field(default_factory=list)
    compute: dict | None = None  # achieved multiply-adds/s at batch 1 beside the peak (export/peak.py)
    startup: list = field(default_factory=list)  # export.load_metrics.StartupStats, one per runtime
    method: str | None = None  # how the figures were measured (default: this module's method)

    def baseline(self, stats: LatencyStats) -> LatencyStats | None:
        """The eager run at the same batch and thread count, if there is one."""
        return next(
            (r for r in self.results if r.backend == "pytorch" and r.batch == stats.batch and r.threads == stats.threads),
            None,
        )

    def to_dict(self) -> dict:
        rows = []
        for r in self.results:
            base = self.baseline(r)
            rows.append({
                **r.to_dict(),
                "speedup_vs_eager_p50": (base.p50_ms / r.p50_ms) if base and r.p50_ms else None,
                "speedup_vs_eager_mean": (base.mean_ms / r.mean_ms) if base and r.mean_ms else None,
            })
        out = {"machine": self.machine, "timing": asdict(self.timing), "method": self.method or __doc__.strip(),
               "notes": self.notes, "results": rows}
        if self.compute is not None:
            out["compute"] = self.compute
        if self.startup:
            out["startup"] = [s.to_dict() for s in self.startup]
        return out

    def table(self) -> str:
        header = ("model", "backend", "provider", "batch", "thr", "runs", "mean ms", "p50", "p90", "p99", "min",
                  "img/s", "p50 vs eager")
        rows = [header]
        for r in self.results:
            base = self.baseline(r)
            rows.append((
                r.label, r.backend, r.provider.replace("ExecutionProvider", ""), _cell(r.batch), _cell(r.threads),
                _cell(r.runs), _cell(r.mean_ms, ".3f"), _cell(r.p50_ms, ".3f"), _cell(r.p90_ms, ".3f"),
                _cell(r.p99_ms, ".3f"), _cell(r.min_ms, ".3f"), _cell(r.throughput, ",.0f"),
                f"{base.p50_ms / r.p50_ms:.2f}x" if base and r.p50_ms else "-",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.startup:
            from export.load_metrics import startup_table

            lines += ["", "start-up per runtime (load = creating the session / loading the model; first = the first "
                          "inference after it; memory in MiB):", startup_table(self.startup)]
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> None:
        from export.io import atomic_output

        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))


def _cell(value, spec: str = "") -> str:
    """One table cell; "-" where a figure is missing (a device runner that does not report it)."""
    return "-" if value is None else format(value, spec)


def benchmark(
    onnx_models: dict[str, str | os.PathLike],
    *,
    torch_model: nn.Module | None = None,
    input_shape: Sequence[int] | None = None,
    batches: Sequence[int] = (1,),
    threads: Sequence[int] | None = None,
    timing: Timing = Timing(),
    provider: str | None = None,
    torch_device: str | torch.device | None = None,
) -> BenchmarkReport:
    """Every (batch, threads) pair for the eager model (if given) and each labelled ONNX file."""
    if not onnx_models and torch_model is None:
        raise UserError("nothing to benchmark")
    if input_shape is None:
        if not onnx_models:
            raise UserError("benchmarking a PyTorch model alone needs its input shape")
        input_shape = onnx_input_shape(next(iter(onnx_models.values())))
    report = BenchmarkReport(timing=timing)
    for batch in dict.fromkeys(int(b) for b in batches):
        if batch < 1:
            raise UserError(f"batch size must be positive, got {batch}")
        for n in threads or thread_counts(None):
            if torch_model is not None:
                report.results.append(
                    bench_torch(torch_model, input_shape, batch=batch, threads=n, device=torch_device, timing=timing)
                )
            for label, path in onnx_models.items():
                report.results.append(
                    bench_onnx(path, batch=batch, threads=n, provider=provider, timing=timing, label=label,
                               input_shape=input_shape)
                )
    return report
