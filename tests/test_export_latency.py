"""export/ latency: the timing loop, percentiles, thread counts, and `kdcompress bench`."""

from __future__ import annotations

import json
import os
import time

import pytest

from _export_models import FAST, SmallNet, make_checkpoint, registered, seeded
from compressor.errors import UserError
from export.latency import Timing, bench_onnx, bench_torch, measure, summarize, thread_counts
from export.pipeline import export_model
from export.runtime import all_cores

__all__ = ["registered"]


def test_summarize_on_a_hand_computed_case():
    stats = summarize([i / 1000 for i in range(1, 101)], label="x", backend="b", provider="p", batch=4, threads=1,
                      warmup=0)
    assert stats.runs == 100 and stats.min_ms == pytest.approx(1.0) and stats.max_ms == pytest.approx(100.0)
    assert stats.mean_ms == pytest.approx(50.5) and stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(4 / 0.0505)


def test_measure_reaches_both_the_minimum_count_and_the_minimum_time():
    calls = []
    times = measure(lambda: calls.append(1), Timing(warmup=3, min_runs=7, min_time=0.0))
    assert len(times) == 7 and len(calls) == 10  # warm-up runs are not timed
    start = time.perf_counter()
    times = measure(lambda: None, Timing(warmup=0, min_runs=1, min_time=0.05))
    assert time.perf_counter() - start >= 0.05 and len(times) > 1
    with pytest.raises(UserError):
        Timing(min_runs=0)


def test_bench_onnx_and_torch_report_ordered_positive_percentiles(tmp_path):
    model = seeded(SmallNet())
    out = tmp_path / "m.onnx"
    export_model(model, out, input_shape=(3, 16, 16), exporter=FAST, measure_cost=False)
    timing = Timing(warmup=2, min_runs=15, min_time=0.02)
    import torch

    threads_before = torch.get_num_threads()
    for batch, threads in ((1, 1), (4, None)):
        for stats in (bench_onnx(out, batch=batch, threads=threads, timing=timing),
                      bench_torch(model, (3, 16, 16), batch=batch, threads=threads, timing=timing)):
            assert stats.runs >= 15 and stats.batch == batch and stats.threads == (threads or all_cores())
            assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms <= stats.max_ms
            assert stats.min_ms <= stats.mean_ms <= stats.max_ms
            assert stats.throughput == pytest.approx(batch * 1000 / stats.mean_ms)
            if threads == 1:  # all work on the calling thread: its CPU time is positive and within the wall time
                assert 0 < stats.cpu_p50_ms <= stats.p50_ms * 1.01 + 0.01
        assert stats.provider == "cpu"
    assert torch.get_num_threads() == threads_before  # restored after timing


def test_thread_counts():
    assert thread_counts("all,1") == list(dict.fromkeys([all_cores(), 1]))
    assert thread_counts("2,2,1") == [2, 1]
    with pytest.raises(UserError, match="bad thread count"):
        thread_counts("two")


def test_cli_bench_onnx_and_checkpoint_with_json(cli, tmp_path, registered):
    name = registered("exporttest_smallnet", SmallNet)
    ckpt = make_checkpoint(tmp_path, name, seeded(SmallNet()))
    onnx_path = tmp_path / "s.onnx"
    assert cli("export", str(ckpt), "-o", str(onnx_path), "--exporter", FAST).exit_code == 0
    js = tmp_path / "bench.json"
    fast = ("--runs", "5", "--min-time", "0", "--warmup", "1")
    result = cli("bench", str(onnx_path), "--batch", "4", "--threads", "all,1", "--json", str(js), *fast)
    assert result.exit_code == 0, result.output
    assert "p50" in result.output and "eager" in result.output  # the recorded source checkpoint was found
    data = json.loads(js.read_text())
    rows = data["results"]
    assert {(r["backend"], r["batch"], r["threads"]) for r in rows} == {
        (b, n, t) for b in ("pytorch", "onnxruntime") for n in (1, 4) for t in thread_counts("all,1")}
    for r in rows:
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["runs"] >= 5
        assert r["speedup_vs_eager_p50"] > 0 and (r["speedup_vs_eager_p50"] == 1.0 or r["backend"] == "onnxruntime")
    assert all(r["provider"] == "CPUExecutionProvider" for r in rows if r["backend"] == "onnxruntime")
    assert data["machine"]["cores"] == all_cores() and data["timing"]["min_runs"] == 5
    # start-up figures per runtime; the eager child cannot build an architecture this test registered in-process
    (ort_row,) = data["startup"]
    assert ort_row["backend"] == "onnxruntime" and ort_row["load_ms"] > 0 and ort_row["peak_rss_mb"] > 0
    assert any("no start-up figures for eager" in n and "exporttest_smallnet" in n for n in data["notes"])
    assert "start-up" in result.output and "peak RSS" in result.output
    # a checkpoint is exported to a temporary file, timed, and nothing is left behind
    before = set(os.listdir(tmp_path))
    result = cli("bench", str(ckpt), "--batch", "1", "--threads", "1", *fast)
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.output and "eager" in result.output
    assert set(os.listdir(tmp_path)) == before


def test_startup_of_an_onnx_file_and_of_a_broken_one(tmp_path):
    from export.load_metrics import Runtime, measure_startup, startup_table

    out = tmp_path / "m.onnx"
    export_model(seeded(SmallNet()), out, input_shape=(3, 16, 16), exporter=FAST, measure_cost=False)
    stats = measure_startup(Runtime("m", "onnxruntime", str(out)), (3, 16, 16), threads=1, batch=2)
    assert stats.backend == "onnxruntime" and stats.provider == "CPUExecutionProvider" and stats.batch == 2
    assert stats.load_ms > 0 and stats.first_ms >= 0 and stats.peak_rss_mb >= stats.base_rss_mb > 0
    assert "load ms" in startup_table([stats]) and f"{stats.peak_rss_mb:.1f}" in startup_table([stats])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(out.read_bytes()[:200])
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        measure_startup(Runtime("b", "onnxruntime", str(broken)), (3, 16, 16), threads=1)


def test_cli_bench_startup_per_runtime_in_its_own_process(cli, tmp_path):
    from compressor.models import create

    ckpt = make_checkpoint(tmp_path, "resnet8", create("resnet8", num_classes=10).eval())
    js = tmp_path / "bench.json"
    result = cli("bench", str(ckpt), "--batch", "1", "--threads", "1", "--runs", "3", "--min-time", "0", "--warmup", "0",
                 "--json", str(js))
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads(js.read_text())["startup"]}
    assert set(rows) == {"pytorch", "onnxruntime"}
    for r in rows.values():
        assert r["load_ms"] > 0 and r["first_ms"] >= 0 and r["batch"] == 1 and r["threads"] == 1
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0
        assert r["model_rss_mb"] == pytest.approx(r["peak_rss_mb"] - r["base_rss_mb"])
    # the onnxruntime child never imported torch: the eager runtime's memory does not mask it
    assert rows["onnxruntime"]["peak_rss_mb"] < rows["pytorch"]["base_rss_mb"]
    assert "peak RSS" in result.output and "first ms" in result.output
