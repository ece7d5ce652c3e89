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
    # a checkpoint is exported to a temporary file, timed, and nothing is left behind
    before = set(os.listdir(tmp_path))
    result = cli("bench", str(ckpt), "--batch", "1", "--threads", "1", *fast)
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.output and "eager" in result.output
    assert set(os.listdir(tmp_path)) == before
