"""export/device_kit.py and `kdcompress device-bench`: a fake `adb` on PATH records every call and
replays real runner output captured from the tools' documentation (tests/data/device_kit/)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from compressor.errors import UserError
from export.device_kit import RUNNER_KINDS, device_bench, infer_kind

DATA = Path(__file__).parent / "data" / "device_kit"

FAKE_ADB = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
if args[:1] == ["-s"]:
    args = args[2:]
if args[:1] == ["devices"]:
    print("List of devices attached")
    for entry in filter(None, os.environ.get("FAKE_ADB_DEVICES", "").split(";")):
        print(entry.replace("=", "\\t"))
    print()
elif args[:1] == ["push"]:
    print(args[1] + ": 1 file pushed, 0 skipped.")
elif args[:1] == ["shell"]:
    command = args[1]
    if command.startswith("getprop"):
        print("Pixel 7")
    elif not command.startswith(("mkdir ", "chmod ", "rm ")):
        with open(os.environ["FAKE_ADB_OUTPUT"]) as fh:
            sys.stdout.write("".join(line for line in fh if not line.startswith("#kd:")))
        sys.exit(int(os.environ.get("FAKE_ADB_STATUS", "0")))
else:
    sys.exit(1)
"""


def captured(name: str) -> str:
    """A fixture's output without its #kd: provenance lines."""
    return "".join(line for line in (DATA / name).read_text().splitlines(True) if not line.startswith("#kd:"))


class FakeAdb:
    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        script = bin_dir / "adb"
        script.write_text(FAKE_ADB.format(python=sys.executable))
        script.chmod(0o755)
        self.log = tmp_path / "adb_calls.jsonl"
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_ADB_LOG", str(self.log))
        self.monkeypatch = monkeypatch
        self.devices("emulator-5554=device")
        self.replay("onnxruntime_perf_test.txt")

    def devices(self, spec: str) -> None:
        self.monkeypatch.setenv("FAKE_ADB_DEVICES", spec)

    def replay(self, fixture: str, status: int = 0) -> None:
        self.monkeypatch.setenv("FAKE_ADB_OUTPUT", str(DATA / fixture))
        self.monkeypatch.setenv("FAKE_ADB_STATUS", str(status))

    @property
    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    @property
    def shell(self) -> list[str]:
        """The command lines run on the device, in order."""
        return [c[3] for c in self.calls if c[:1] == ["-s"] and c[2] == "shell"]


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    return FakeAdb(tmp_path, monkeypatch)


def tiny_onnx(path: Path) -> Path:
    """A one-node model with a dynamic batch (what kdcompress export writes), for the batch figure."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 8, 8])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def runner_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x7fELF fake runner")
    return path


# -- parsers on the captured outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture, kind, expected", [
    ("onnxruntime_perf_test.txt", "onnxruntime_perf_test",
     dict(runs=5, mean_ms=98.961997, p50_ms=99.5086, p90_ms=101.519, p95_ms=101.519, p99_ms=101.519, min_ms=95.8204,
          max_ms=101.519, load_ms=217.932, first_ms=196.0, peak_memory_mb=271122432 / 2 ** 20)),
    ("onnxruntime_perf_test_acl.txt", "onnxruntime_perf_test",  # ORT 1.3: no first inference, no percentiles
     dict(runs=10, mean_ms=144.871, load_ms=127.918, first_ms=None, p50_ms=None, peak_memory_mb=158171136 / 2 ** 20)),
    ("benchmark_model.txt", "benchmark_model",
     dict(runs=50, mean_ms=249.684, min_ms=247.067, max_ms=254.474, std_ms=1.442, load_ms=16.242, first_ms=360.262,
          memory_growth_mb=138.809, peak_memory_mb=None)),
    # the op profiler's "Timings (microseconds): count=50 ..." after the summary is not the benchmark's line
    ("benchmark_model_profiling.txt", "benchmark_model",
     dict(runs=50, mean_ms=2950.34, min_ms=2727.568, max_ms=3189.954, std_ms=109.798, load_ms=17.187,
          first_ms=3512.391, memory_growth_mb=46.0859)),
    ("executor_runner.txt", "executor_runner", dict(runs=1, mean_ms=15.013292, load_ms=None, first_ms=None)),
    # iterations 3, 2, 4 ms: the first is the first inference, the steady state is (2, 4)
    ("executor_runner_iterations.txt", "executor_runner",
     dict(runs=2, mean_ms=3.0, first_ms=3.0, min_ms=2.0, max_ms=4.0, p50_ms=3.0, std_ms=1.0, load_ms=7.5)),
])
def test_parsers_read_the_captured_outputs(fixture, kind, expected):
    figures = RUNNER_KINDS[kind].parse(captured(fixture))
    for name, value in expected.items():
        got = getattr(figures, name)
        assert got == (pytest.approx(value) if value is not None else None), name


# -- the whole kit through the fake adb --------------------------------------------------------------------------------

def test_cli_device_bench_pushes_runs_parses_and_cleans_up(cli, fake_adb, tmp_path):
    model = tiny_onnx(tmp_path / "student.onnx")
    runner = runner_file(tmp_path, "onnxruntime_perf_test")
    js = tmp_path / "device.json"
    result = cli("device-bench", str(model), "--adb", "--runner", str(runner), "--runs", "5", "--threads", "1",
                 "--json", str(js))
    assert result.exit_code == 0, result.output
    calls = fake_adb.calls
    assert calls[0] == ["devices"]
    device_calls = [c[2:] for c in calls[1:]]
    assert all(c[:2] == ["-s", "emulator-5554"] for c in calls[1:])
    mkdir = next(c for c in device_calls if c[0] == "shell" and c[1].startswith("mkdir -p "))
    remote = mkdir[1].split()[-1]
    assert re.fullmatch(r"/data/local/tmp/kdcompress-[0-9a-f]{8}", remote)
    assert ["push", str(model), f"{remote}/student.onnx"] in device_calls
    assert ["push", str(runner), f"{remote}/onnxruntime_perf_test"] in device_calls
    assert ["shell", f"chmod 755 {remote}/onnxruntime_perf_test"] in device_calls
    run = next(c[1] for c in device_calls if c[0] == "shell" and "./onnxruntime_perf_test" in c[1])
    assert run.startswith(f"cd {remote} && ") and run.endswith("./onnxruntime_perf_test -I -m times -r 5 -s -x 1 student.onnx")
    assert device_calls[-1] == ["shell", f"rm -rf {remote}"]  # cleaned up last
    order = [device_calls.index(c) for c in (mkdir, ["shell", f"chmod 755 {remote}/onnxruntime_perf_test"])]
    assert order == sorted(order) and device_calls.index(mkdir) < len(device_calls) - 1
    data = json.loads(js.read_text())
    (row,) = data["results"]
    assert row["mean_ms"] == pytest.approx(98.961997) and row["p50_ms"] == pytest.approx(99.5086)
    assert row["runs"] == 5 and row["batch"] == 1 and row["threads"] == 1 and row["backend"] == "onnxruntime"
    assert row["throughput"] == pytest.approx(1000 / 98.961997)
    (startup,) = data["startup"]
    assert startup["load_ms"] == pytest.approx(217.932) and startup["first_ms"] == pytest.approx(196.0)
    assert startup["peak_rss_mb"] == pytest.approx(258.5625)
    assert data["machine"]["device"] == "emulator-5554" and data["machine"]["model"] == "Pixel 7"
    assert data["machine"]["runner"] == "onnxruntime_perf_test" and data["machine"]["remote_dir"] == remote
    assert "98.962" in result.output and "217.9" in result.output and "Pixel 7" in result.output


@pytest.mark.parametrize("fixture, runner_name, suffix, args, mean", [
    ("benchmark_model.txt", "benchmark_model", ".tflite", ["--graph=m.tflite", "--num_runs=7", "--num_threads=2"],
     249.684),
    ("executor_runner_iterations.txt", "executor_runner", ".pte",
     ["--model_path=m.pte", "--num_executions=8", "--cpu_threads=2"], 3.0),
])
def test_device_bench_speaks_each_runners_arguments(fake_adb, tmp_path, fixture, runner_name, suffix, args, mean):
    fake_adb.replay(fixture)
    model = tmp_path / f"m{suffix}"
    model.write_bytes(b"model bytes")
    run = device_bench(model, runner_file(tmp_path, runner_name), runs=7, threads=2)
    assert run.kind.name == runner_name and run.figures.mean_ms == pytest.approx(mean)
    command = next(c for c in fake_adb.shell if f"./{runner_name}" in c)
    assert command.endswith(" ".join([f"./{runner_name}", *args]))
    assert fake_adb.calls[-1][2:] == ["shell", f"rm -rf {run.remote_dir}"]
    assert run.batch is None  # not an ONNX file: the runner feeds the exported shape


def test_a_failing_runner_is_one_line_exit_2_and_the_folder_is_still_removed(cli, fake_adb, tmp_path):
    fake_adb.replay("onnxruntime_perf_test_acl.txt", status=1)
    model = tiny_onnx(tmp_path / "s.onnx")
    result = cli("device-bench", str(model), "--adb", "--runner", str(runner_file(tmp_path, "onnxruntime_perf_test")))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "onnxruntime_perf_test failed on emulator-5554 (exit 1)" in result.output
    mkdir = next(c for c in fake_adb.shell if c.startswith("mkdir -p "))
    assert fake_adb.shell[-1] == f"rm -rf {mkdir.split()[-1]}"


def test_output_without_a_latency_is_a_clear_error(fake_adb, tmp_path):
    fake_adb.replay("executor_runner.txt")  # ExecuTorch output handed to the ORT parser
    with pytest.raises(UserError, match="printed no latency that onnxruntime_perf_test's parser knows"):
        device_bench(tiny_onnx(tmp_path / "s.onnx"), runner_file(tmp_path, "onnxruntime_perf_test"))
    assert fake_adb.shell[-1].startswith("rm -rf /data/local/tmp/kdcompress-")


def test_devices_missing_several_or_not_ready(cli, fake_adb, tmp_path):
    model, runner = tiny_onnx(tmp_path / "s.onnx"), runner_file(tmp_path, "onnxruntime_perf_test")
    args = ("device-bench", str(model), "--adb", "--runner", str(runner))
    fake_adb.devices("")
    result = cli(*args)
    assert result.exit_code == 2 and "no Android device is ready: adb devices lists none" in result.output
    fake_adb.devices("R58M=unauthorized")
    result = cli(*args)
    assert result.exit_code == 2 and "R58M (unauthorized)" in result.output
    fake_adb.devices("emulator-5554=device;R58M=device")
    result = cli(*args)
    assert result.exit_code == 2 and "2 devices are attached (emulator-5554, R58M): pick one with --serial" in result.output
    assert result.output.count("\n") == 1
    assert not any("push" in c for c in fake_adb.calls)  # nothing was pushed
    result = cli(*args, "--serial", "R58M", "--runs", "5")
    assert result.exit_code == 0, result.output
    assert all(c[:2] == ["-s", "R58M"] for c in fake_adb.calls if c != ["devices"])
    result = cli(*args, "--serial", "nope")
    assert result.exit_code == 2 and "device nope cannot be used: it is not attached" in result.output


def test_no_adb_on_path_is_one_line(cli, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    model, runner = tiny_onnx(tmp_path / "s.onnx"), runner_file(tmp_path, "onnxruntime_perf_test")
    result = cli("device-bench", str(model), "--adb", "--runner", str(runner))
    assert result.exit_code == 2 and "adb is not on PATH" in result.output and result.output.count("\n") == 1
    result = cli("device-bench", str(model), "--runner", str(runner))
    assert result.exit_code == 2 and "pass --adb" in result.output


def test_runner_kind_from_the_name_or_the_flag(tmp_path):
    assert infer_kind("/x/onnxruntime_perf_test").name == "onnxruntime_perf_test"
    assert infer_kind("build/executor_runner").name == "executor_runner"
    assert infer_kind("android_aarch64_benchmark_model").name == "benchmark_model"
    assert infer_kind("my_runner", "executor_runner").name == "executor_runner"
    with pytest.raises(UserError, match="cannot tell which tool my_runner is from its name: give --runner-kind"):
        infer_kind("my_runner")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(UserError, match=r"benchmark_model runs \.tflite files, not m\.onnx"):
        device_bench(model, runner_file(tmp_path, "benchmark_model"))
    with pytest.raises(UserError, match="runner .*nope does not exist"):
        device_bench(model, tmp_path / "nope")
