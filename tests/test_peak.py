"""export/peak.py: the CPU's nominal multiply-add peak from its flags and clock, the achieved rate of
each back end at batch 1, and `kdcompress bench` reporting both."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from _export_models import FAST, SmallNet, make_checkpoint, registered, seeded
from export.peak import CpuPeak, achieved, isa_of, parse_cpuinfo, peak_of

__all__ = ["registered"]

X86 = """processor\t: 0
model name\t: Some CPU
cpu MHz\t\t: 2400.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f
processor\t: 1
cpu MHz\t\t: 2596.120
flags\t\t: fpu sse sse2 avx fma avx2 avx512f
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\ncpu MHz\t\t: 2000\n"


def test_cpuinfo_flags_and_the_largest_clock():
    flags, mhz = parse_cpuinfo(X86)
    assert {"avx2", "fma", "avx512f"} <= flags and mhz == 2596.12
    assert parse_cpuinfo(ARM) == ({"fp", "asimd", "evtstrm", "aes"}, 2000.0)


@pytest.mark.parametrize("flags, expected", [
    ({"sse2", "avx", "fma", "avx2", "avx512f"}, ("AVX-512 FMA", 32)),
    ({"sse2", "avx", "fma", "avx2"}, ("AVX2 FMA", 16)),
    ({"sse2", "avx", "avx2"}, ("AVX", 8)),  # AVX2 without FMA: no fused multiply-add
    ({"sse2"}, ("SSE2", 4)),
    ({"fp", "asimd"}, ("NEON FMA", 8)),
    (set(), ("scalar", 1)),
])
def test_widest_instruction_set(flags, expected):
    assert isa_of(flags) == expected


def test_peak_is_cores_times_clock_times_multiply_adds_per_cycle():
    peak = peak_of(X86, cores=2)
    assert peak.isa == "AVX-512 FMA" and peak.ghz == pytest.approx(2.59612)
    assert peak.macs_per_s(1) == pytest.approx(2.59612e9 * 32)
    assert peak.macs_per_s(2) == pytest.approx(2 * 2.59612e9 * 32)
    assert peak.macs_per_s(8) == peak.macs_per_s(2)  # threads beyond the cores add nothing
    capped = peak_of(X86, cores=4, max_khz="3500000")  # cpufreq's maximum wins over the current clock
    assert capped.ghz == 3.5 and capped.clock_source == "cpufreq maximum"
    assert peak_of("flags: avx2 fma\n", cores=1) is None  # no clock, no peak


def test_achieved_rate_at_batch_one_and_its_share():
    peak = CpuPeak("AVX2 FMA", 16, 2.5, 4, "test")  # 40 G multiply-adds/s per core
    results = [SimpleNamespace(label="onnx fp32", backend="onnxruntime", provider="CPUExecutionProvider", batch=1,
                               threads=1, p50_ms=2.0),
               SimpleNamespace(label="eager", backend="pytorch", provider="cpu", batch=1, threads=2, p50_ms=4.0),
               SimpleNamespace(label="eager", backend="pytorch", provider="cpu", batch=8, threads=1, p50_ms=9.0),
               SimpleNamespace(label="onnx fp32", backend="onnxruntime", provider="CUDAExecutionProvider", batch=1,
                               threads=1, p50_ms=0.1)]
    rows = achieved(results, 40_000_000, peak)
    assert [(r.label, r.threads) for r in rows] == [("onnx fp32", 1), ("eager", 2)]  # batch 8 and CUDA left out
    assert rows[0].macs_per_s == pytest.approx(20e9) and rows[0].share_of_peak == pytest.approx(0.5)
    assert rows[1].macs_per_s == pytest.approx(10e9) and rows[1].share_of_peak == pytest.approx(10 / 80)


def test_cli_bench_reports_compute_beside_the_peak(cli, tmp_path, registered):
    name = registered("peaktest_smallnet", SmallNet)
    ckpt = make_checkpoint(tmp_path, name, seeded(SmallNet()))
    onnx_path = tmp_path / "s.onnx"
    assert cli("export", str(ckpt), "-o", str(onnx_path), "--exporter", FAST).exit_code == 0
    js = tmp_path / "bench.json"
    result = cli("bench", str(onnx_path), "--batch", "2", "--threads", "1", "--runs", "3", "--min-time", "0",
                 "--warmup", "1", "--json", str(js))
    assert result.exit_code == 0, result.output
    assert "compute at batch 1:" in result.output and "G multiply-adds/s" in result.output
    compute = json.loads(js.read_text())["compute"]
    assert compute["macs_per_image"] > 0
    assert {(r["backend"], r["threads"]) for r in compute["rows"]} == {("pytorch", 1), ("onnxruntime", 1)}
    for r in compute["rows"]:
        assert r["macs_per_s"] == pytest.approx(compute["macs_per_image"] / (r["p50_ms"] / 1e3))
