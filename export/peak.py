"""How close a forward pass comes to what the CPU could do: achieved multiply-adds per second beside
the machine's nominal peak for the vector instruction set it has.

Peak (fp32, multiply-adds per second) = cores used x clock x multiply-adds per cycle per core, where
the last is SIMD lanes x FMA units of the widest instruction set the CPU reports:

    AVX-512 (avx512f)       16 lanes x 2 FMA units = 32   Intel Xeon Skylake-SP and later, AMD Zen 5
    AVX2 + FMA (avx2, fma)   8 lanes x 2 FMA units = 16   Intel Haswell and later, AMD Zen 2-4
    AVX (no FMA)             8 lanes, 1 mul + 1 add =  8
    SSE2                     4 lanes, 1 mul + 1 add =  4
    NEON (asimd, aarch64)    4 lanes x 2 FMA units =  8   Cortex-A76 / Neoverse N1 and later

It is an upper bound: parts with one 512-bit FMA unit (some Xeon Silver/Bronze; Zen 4 runs AVX-512
on 256-bit units) reach half, and the clock is the highest the machine reports (cpufreq's maximum,
else the largest "cpu MHz" in /proc/cpuinfo, which on a VM is the base clock: a core boosting above
it can show more than 100%, as can int8, whose VNNI units do 4x the fp32 multiply-adds). Multiply-adds are
counted as fvcore counts FLOPs (1 FLOP = 1 multiply-add), so model FLOPs / latency compares directly.
Measured here (AMD EPYC, AVX-512, 1 thread, batch 1, loaded machine): eager PyTorch reached 4% of it on
the digits ResNet-20 and 15% on ResNet-20 at 32x32 (per-op overhead dominates small ops), onnxruntime
61% and 94%: the gap between the two is the headroom an export buys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

# (label, required flags, lanes, FMA units) widest first
_ISAS: tuple[tuple[str, frozenset[str], int, int], ...] = (
    ("AVX-512 FMA", frozenset({"avx512f"}), 16, 2),
    ("AVX2 FMA", frozenset({"avx2", "fma"}), 8, 2),
    ("AVX", frozenset({"avx"}), 8, 1),
    ("NEON FMA", frozenset({"asimd"}), 4, 2),
    ("SSE2", frozenset({"sse2"}), 4, 1),
)


@dataclass(frozen=True)
class CpuPeak:
    isa: str
    macs_per_cycle: int  # per core
    ghz: float
    cores: int
    clock_source: str

    def macs_per_s(self, threads: int) -> float:
        """Nominal peak with ``threads`` intra-op threads (at most one per core)."""
        return min(max(1, threads), self.cores) * self.ghz * 1e9 * self.macs_per_cycle

    def describe(self) -> str:
        return (f"{self.isa}: {self.macs_per_cycle} multiply-adds/cycle/core x {self.ghz:.2f} GHz "
                f"({self.clock_source}) = {self.macs_per_s(1) / 1e9:.1f} G/s per core, "
                f"{self.macs_per_s(self.cores) / 1e9:.1f} G/s on {self.cores} core{'s' if self.cores != 1 else ''}")


def parse_cpuinfo(text: str) -> tuple[set[str], float | None]:
    """(feature flags, largest "cpu MHz") from /proc/cpuinfo (x86 "flags", ARM "Features")."""
    flags: set[str] = set()
    mhz: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key == "cpu mhz":
            try:
                mhz = max(mhz or 0.0, float(value))
            except ValueError:
                pass
    return flags, mhz


def isa_of(flags: Iterable[str]) -> tuple[str, int]:
    """(instruction set, fp32 multiply-adds per cycle per core) of the widest set the flags name."""
    have = set(flags)
    for label, needed, lanes, units in _ISAS:
        if needed <= have:
            return label, lanes * units
    return "scalar", 1


def peak_of(cpuinfo: str, cores: int, max_khz: str | None = None) -> CpuPeak | None:
    """The nominal peak from /proc/cpuinfo's text (and cpufreq's cpuinfo_max_freq in kHz, if any)."""
    flags, mhz = parse_cpuinfo(cpuinfo)
    source = "cpu MHz in /proc/cpuinfo"
    if max_khz:
        try:
            mhz, source = float(max_khz) / 1000.0, "cpufreq maximum"
        except ValueError:
            pass
    if not mhz:
        return None
    isa, per_cycle = isa_of(flags)
    return CpuPeak(isa, per_cycle, mhz / 1000.0, max(1, cores), source)


def detect_peak(cores: int) -> CpuPeak | None:
    """This machine's nominal peak (None where /proc/cpuinfo says no clock, e.g. not Linux)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    try:
        max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip()
    except OSError:
        max_khz = None
    return peak_of(cpuinfo, cores, max_khz)


@dataclass(frozen=True)
class Achieved:
    label: str
    backend: str
    threads: int
    p50_ms: float
    macs_per_s: float
    peak_macs_per_s: float | None
    share_of_peak: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def achieved(results: Iterable[Any], macs_per_image: int, peak: CpuPeak | None, batch: int = 1) -> list[Achieved]:
    """Multiply-adds per second of each CPU result at ``batch`` (``macs_per_image`` x batch / its
    median latency) and its share of the peak for its thread count."""
    rows = []
    for r in results:
        if r.batch != batch or "CUDA" in r.provider or r.provider.startswith("cuda"):
            continue
        rate = macs_per_image * batch / (r.p50_ms / 1e3)
        top = peak.macs_per_s(r.threads) if peak else None
        rows.append(Achieved(r.label, r.backend, r.threads, r.p50_ms, rate, top, rate / top if top else None))
    return rows
