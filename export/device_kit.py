"""Time a model on an Android phone with the runtime's own benchmark binary, over ``adb``.

What a phone developer measures by hand, in one call: the model and a runner binary the user
built for the device (onnxruntime's ``onnxruntime_perf_test``, ExecuTorch's ``executor_runner``
or LiteRT/TFLite's ``benchmark_model``) are pushed to a fresh ``/data/local/tmp/kdcompress-<random>/``,
the runner is made executable and run there with that tool's own arguments for N timed runs at T
threads, its console output is parsed into the figures ``kdcompress bench`` reports (latency
mean/p50/p90/p99/min/max where the tool prints them, load/init time, first inference, peak
memory), and the remote folder is removed, also when something failed.

Each runner kind is one :class:`RunnerKind` in :data:`RUNNER_KINDS` (its binary names, the model
files it runs, its command line and its output parser): adding a runner is one registration.
What each tool prints (all times converted to milliseconds):
  * ``onnxruntime_perf_test -I -m times -r N -s -x T MODEL``: "Session creation time cost" (load),
    "First inference time cost" (its warm-up run), "Average inference time cost[ total]",
    "Min/Max/P50/P90/P95/P99 Latency" (with ``-s``) and "Peak working set size" (bytes);
  * ``benchmark_model --graph=MODEL --num_runs=N --num_threads=T``: "Inference timings in us:
    Init, First inference, Warmup (avg), Inference (avg)", the timed runs' "count= ... min= max=
    avg= std= [p5= median= p95=]" line, and memory ("Overall peak memory footprint (MB) via periodic
    monitoring" is a peak; the "init=/overall=" lines are growth since the tool started);
  * ``executor_runner --model_path=MODEL --num_executions=N+1 --cpu_threads=T``: "Model loaded in X
    ms" (newer runners), one "Iteration i of N: X ms" per run (newer runners; the first is the
    first inference, the others are the steady state) and "Model executed successfully N time(s)
    in X ms" (mean = X / N where there are no per-run lines). No memory figure.
A runner's own timing includes no adb overhead: it runs on the device and reports itself.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np

from compressor.errors import UserError

REMOTE_ROOT = PurePosixPath("/data/local/tmp")
DEFAULT_RUNS = 50
DEFAULT_TIMEOUT = 1800.0  # seconds for the run on the device
MIB = 1024 * 1024


@dataclass
class DeviceFigures:
    """What one runner printed, in milliseconds and MiB; None where it printed nothing for it."""

    runs: int | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    std_ms: float | None = None
    load_ms: float | None = None
    first_ms: float | None = None
    peak_memory_mb: float | None = None  # the process's peak, where the tool measures one
    memory_growth_mb: float | None = None  # growth since the tool started (TFLite's init=/overall=)


Command = Callable[[str, str, int, int | None], list[str]]
Parser = Callable[[str], DeviceFigures]


@dataclass(frozen=True)
class RunnerKind:
    name: str
    binaries: tuple[str, ...]  # file names that say which tool a runner is
    model_suffixes: tuple[str, ...]
    command: Command  # (runner, model, runs, threads) -> argv on the device
    parse: Parser
    runtime: str  # what the runner runs, for the report's backend column


RUNNER_KINDS: dict[str, RunnerKind] = {}


def register_runner(kind: RunnerKind) -> RunnerKind:
    RUNNER_KINDS[kind.name] = kind
    return kind


# -- parsers -------------------------------------------------------------------------------------------------------

_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def _find(pattern: str, text: str, scale: float = 1.0) -> float | None:
    """The first number the pattern captures, times ``scale``; None when the tool did not print it."""
    match = re.search(pattern, text, re.MULTILINE)
    return None if match is None else float(match.group(1)) * scale


def parse_onnxruntime_perf_test(text: str) -> DeviceFigures:
    figures = DeviceFigures(
        load_ms=_find(rf"Session creation time cost:\s*{_NUMBER}\s*s", text, 1e3),
        first_ms=_find(rf"First inference time cost:\s*{_NUMBER}\s*ms", text),
        mean_ms=_find(rf"Average inference time cost(?: total)?:\s*{_NUMBER}\s*ms", text),
        peak_memory_mb=_find(rf"Peak working set size:\s*{_NUMBER}", text, 1 / MIB),
    )
    runs = _find(rf"Total inference requests:\s*{_NUMBER}", text)
    figures.runs = None if runs is None else int(runs)
    # "P50 Latency: 0.0995 s" (ORT >= 1.10) or "P50 Latency is 0.0587108sec" (older)
    for name, attr in (("Min", "min_ms"), ("Max", "max_ms"), ("P50", "p50_ms"), ("P90", "p90_ms"),
                       ("P95", "p95_ms"), ("P99", "p99_ms")):
        setattr(figures, attr, _find(rf"^{name} Latency(?::| is)\s*{_NUMBER}\s*s", text, 1e3))
    return figures


_TFLITE_RUNS = re.compile(r"^(?:.*?:\s*)?count=(\d+) first=\S+ curr=\S+ min=(\S+) max=(\S+) avg=(\S+) std=(\S+)"
                          r"(?: p5=\S+ median=(\S+) p95=(\S+))?", re.MULTILINE)


def parse_benchmark_model(text: str) -> DeviceFigures:
    timings = re.search(rf"Inference timings in us: Init: {_NUMBER}, First inference: {_NUMBER}, "
                        rf"Warmup \(avg\): {_NUMBER}, Inference \(avg\): {_NUMBER}", text)
    figures = DeviceFigures()
    if timings is not None:
        init, first, _warmup, mean = (float(g) for g in timings.groups())
        figures.load_ms, figures.first_ms, figures.mean_ms = init / 1e3, first / 1e3, mean / 1e3
        # the timed runs' statistics: the last "count=" line before the summary (the op profiler
        # prints more "count=" lines after it, which are per-operator sums)
        runs = list(_TFLITE_RUNS.finditer(text[:timings.start()]))
        if runs:
            last = runs[-1]
            figures.runs = int(last.group(1))
            figures.min_ms, figures.max_ms = float(last.group(2)) / 1e3, float(last.group(3)) / 1e3
            figures.std_ms = float(last.group(5)) / 1e3
            if last.group(6) is not None:
                figures.p50_ms, figures.p95_ms = float(last.group(6)) / 1e3, float(last.group(7)) / 1e3
    figures.peak_memory_mb = _find(rf"Overall peak memory footprint \(MB\) via periodic monitoring:\s*{_NUMBER}", text)
    # TF <= 2.4 "Peak memory footprint (MB): init= overall=" and later "Memory footprint delta from the start
    # of the tool (MB): ..." are the same figure, renamed: growth of the process's max RSS since the tool started
    figures.memory_growth_mb = _find(rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint) "
                                     rf"\(MB\): init=\S+ overall={_NUMBER}", text)
    return figures


def parse_executor_runner(text: str) -> DeviceFigures:
    figures = DeviceFigures(load_ms=_find(rf"Model loaded in {_NUMBER} ms", text))
    iterations = [float(m.group(1)) for m in re.finditer(rf"Iteration \d+ of \d+: {_NUMBER} ms", text)]
    total = re.search(rf"Model executed successfully (\d+) time\(s\) in {_NUMBER} ms", text)
    if iterations:
        figures.first_ms = iterations[0]
        steady = np.asarray(iterations[1:] or iterations, dtype=np.float64)
        p50, p90, p99 = np.percentile(steady, [50, 90, 99])
        figures.runs = int(steady.size)
        figures.mean_ms, figures.std_ms = float(steady.mean()), float(steady.std())
        figures.min_ms, figures.max_ms = float(steady.min()), float(steady.max())
        figures.p50_ms, figures.p90_ms, figures.p99_ms = float(p50), float(p90), float(p99)
    elif total is not None:
        figures.runs = int(total.group(1))
        figures.mean_ms = float(total.group(2)) / max(figures.runs, 1)
    return figures


# -- the three runners ---------------------------------------------------------------------------------------------

register_runner(RunnerKind(
    name="onnxruntime_perf_test", binaries=("onnxruntime_perf_test", "perf_test"), model_suffixes=(".onnx", ".ort"),
    command=lambda runner, model, runs, threads: [runner, "-I", "-m", "times", "-r", str(runs), "-s",
                                                  *(["-x", str(threads)] if threads else []), model],
    parse=parse_onnxruntime_perf_test, runtime="onnxruntime"))
register_runner(RunnerKind(
    name="executor_runner", binaries=("executor_runner",), model_suffixes=(".pte",),
    # one execution more than asked: the first is the first inference, the others the timed runs (as the
    # other two tools run a warm-up before their N runs)
    command=lambda runner, model, runs, threads: [runner, f"--model_path={model}", f"--num_executions={runs + 1}",
                                                  *([f"--cpu_threads={threads}"] if threads else [])],
    parse=parse_executor_runner, runtime="executorch"))
register_runner(RunnerKind(
    name="benchmark_model", binaries=("benchmark_model",), model_suffixes=(".tflite",),
    command=lambda runner, model, runs, threads: [runner, f"--graph={model}", f"--num_runs={runs}",
                                                  *([f"--num_threads={threads}"] if threads else [])],
    parse=parse_benchmark_model, runtime="litert"))


def infer_kind(runner: str | Path, kind: str = "auto") -> RunnerKind:
    """The runner kind asked for, or the one its file name says (``auto``)."""
    if kind != "auto":
        if kind not in RUNNER_KINDS:
            raise UserError(f"unknown runner kind {kind!r}: choose auto, {', '.join(RUNNER_KINDS)}")
        return RUNNER_KINDS[kind]
    name = Path(runner).name
    for candidate in RUNNER_KINDS.values():
        if any(binary in name for binary in candidate.binaries):
            return candidate
    raise UserError(f"cannot tell which tool {name} is from its name: give --runner-kind "
                    f"({', '.join(RUNNER_KINDS)})")


# -- adb -----------------------------------------------------------------------------------------------------------

@dataclass
class Adb:
    """The ``adb`` client on PATH, talking to one device; every call is recorded in ``calls``."""

    executable: str
    serial: str | None = None
    calls: list[list[str]] = field(default_factory=list)

    @classmethod
    def find(cls) -> "Adb":
        path = shutil.which("adb")
        if path is None:
            raise UserError("adb is not on PATH: install Android's platform-tools and connect the device over USB "
                            "or `adb connect`")
        return cls(path)

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        argv = [self.executable, *(["-s", self.serial] if self.serial else []), *args]
        self.calls.append(argv[1:])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"adb {' '.join(args[:2])} did not finish within {timeout:g} s") from None
        if check and done.returncode != 0:
            raise UserError(f"adb {' '.join(args[:2])} failed (exit {done.returncode}): {_last_line(done)}")
        return done

    def pick_device(self, serial: str | None) -> str:
        """The one device to use: ``serial`` if it is attached, else the only attached device."""
        states: dict[str, str] = {}
        for line in self.run("devices").stdout.splitlines():  # "SERIAL<TAB>device", after a header line
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("List of", "*")):
                states[parts[0]] = parts[1]
        ready = [s for s, state in states.items() if state == "device"]
        if serial is not None:
            if states.get(serial) != "device":
                shown = f"it is {states[serial]}" if serial in states else "it is not attached"
                raise UserError(f"device {serial} cannot be used: {shown} (adb devices lists "
                                f"{', '.join(states) or 'none'})")
            self.serial = serial
            return serial
        if not ready:
            others = ", ".join(f"{s} ({state})" for s, state in states.items())
            raise UserError("no Android device is ready: adb devices lists " + (others or "none")
                            + "; connect one and allow USB debugging")
        if len(ready) > 1:
            raise UserError(f"{len(ready)} devices are attached ({', '.join(ready)}): pick one with --serial")
        self.serial = ready[0]
        return self.serial

    def shell(self, command: str, *, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("shell", command, timeout=timeout, check=check)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or "").strip().splitlines() or (done.stdout or "").strip().splitlines()
    return lines[-1][:300] if lines else "no output"


# -- the run ------------------------------------------------------------------------------------------------------

@dataclass
class DeviceRun:
    kind: RunnerKind
    serial: str
    device_model: str
    remote_dir: str
    command: list[str]
    figures: DeviceFigures
    output: str
    runs: int
    threads: int | None
    batch: int | None
    label: str


def device_bench(model: str | Path, runner: str | Path, *, kind: str = "auto", serial: str | None = None,
                 runs: int = DEFAULT_RUNS, threads: int | None = 1, extra_files: Sequence[str | Path] = (),
                 timeout: float = DEFAULT_TIMEOUT, adb: Adb | None = None) -> DeviceRun:
    """Push, run, parse, clean up (see the module doc). A user mistake or a failed runner is a UserError."""
    model, runner = Path(model), Path(runner)
    for path, what in [(model, "model"), (runner, "runner"), *((Path(p), "file to push") for p in extra_files)]:
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    runner_kind = infer_kind(runner, kind)
    if model.suffix.lower() not in runner_kind.model_suffixes:
        raise UserError(f"{runner_kind.name} runs {' or '.join(runner_kind.model_suffixes)} files, not {model.name}")
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    adb = adb or Adb.find()
    serial = adb.pick_device(serial)
    device_model = adb.shell("getprop ro.product.model", check=False).stdout.strip() or "unknown"
    remote = REMOTE_ROOT / f"kdcompress-{secrets.token_hex(4)}"
    remote_model, remote_runner = remote / model.name, remote / runner.name
    command = runner_kind.command(f"./{runner.name}", model.name, runs, threads)
    try:
        adb.shell(f"mkdir -p {shlex.quote(str(remote))}")
        for local in (model, runner, *map(Path, extra_files)):
            adb.run("push", str(local), str(remote / local.name), timeout=600.0)
        adb.shell(f"chmod 755 {shlex.quote(str(remote_runner))}")
        # shared libraries pushed beside the runner (libonnxruntime.so ...) are found through LD_LIBRARY_PATH
        line = (f"cd {shlex.quote(str(remote))} && LD_LIBRARY_PATH={shlex.quote(str(remote))}:$LD_LIBRARY_PATH "
                + shlex.join(command))
        done = adb.shell(line, timeout=timeout, check=False)
    finally:
        adb.shell(f"rm -rf {shlex.quote(str(remote))}", check=False)
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        raise UserError(f"{runner.name} failed on {serial} (exit {done.returncode}): {_last_line(done)}")
    figures = runner_kind.parse(output)
    if figures.mean_ms is None:
        tail = (output.strip().splitlines() or ["no output"])[-1][:200]
        raise UserError(f"{runner.name} printed no latency that {runner_kind.name}'s parser knows; "
                        f"its last line: {tail}")
    return DeviceRun(kind=runner_kind, serial=serial, device_model=device_model, remote_dir=str(remote),
                     command=command, figures=figures, output=output, runs=runs, threads=threads,
                     batch=_batch_of(model), label=model.name)


def _batch_of(model: Path) -> int | None:
    """The batch an ONNX file's input is fixed at; 1 where it is dynamic (the perf tool's -I fills free
    dimensions with 1); None for other formats (the runner feeds the exported shape, not read here)."""
    if model.suffix.lower() != ".onnx":
        return None
    from export.latency import fixed_batch

    try:
        return fixed_batch(model) or 1
    except Exception:  # a file onnx cannot read or that is not an image model: the batch is only informative
        return None


def to_report(run: DeviceRun):
    """The run as :class:`export.latency.BenchmarkReport`: the same JSON and table as ``kdcompress bench``."""
    from export.latency import BenchmarkReport, LatencyStats, Timing
    from export.load_metrics import StartupStats

    f = run.figures
    throughput = None if run.batch is None or not f.mean_ms else run.batch / (f.mean_ms / 1e3)
    total_s = None if f.mean_ms is None or f.runs is None else f.mean_ms * f.runs / 1e3
    stats = LatencyStats(label=run.label, backend=run.kind.runtime, provider=f"device:{run.serial}", batch=run.batch,
                         threads=run.threads, warmup=0, runs=f.runs, total_s=total_s, mean_ms=f.mean_ms,
                         p50_ms=f.p50_ms, p90_ms=f.p90_ms, p99_ms=f.p99_ms, min_ms=f.min_ms, max_ms=f.max_ms,
                         std_ms=f.std_ms, throughput=throughput, p95_ms=f.p95_ms)
    startup = StartupStats(label=run.label, backend=run.kind.runtime, provider=f"device:{run.serial}", batch=run.batch,
                           threads=run.threads, load_ms=f.load_ms, first_ms=f.first_ms, peak_rss_mb=f.peak_memory_mb,
                           model_rss_mb=f.memory_growth_mb)
    machine = {"device": run.serial, "model": run.device_model, "runner": run.kind.name,
               "command": run.command, "remote_dir": run.remote_dir}
    return BenchmarkReport(results=[stats], timing=Timing(warmup=0, min_runs=run.runs, min_time=0.0),
                           machine=machine, startup=[startup], method=__doc__.strip())
