"""PyTorch eager vs onnxruntime fp32 vs onnxruntime int8 vs every export target's own runtime:
latency of the benchmark students, same run.

    python benchmarks/export_latency.py [--models resnet20,resnet8x4,wrn_16_2,MobileNetV2,ShuffleV2]
        [--batch 1] [--threads 1] [--rounds 5] [--runs 200] [--min-time 1.0] [--data SPEC]
        [--targets ort,executorch,openvino,tflite]

Each student (3x32x32, 100 classes, random init) is exported with the default pipeline (dynamo,
verified by checker + parity) and quantized (static QDQ, per-channel, U8S8 with 7-bit weights,
calibrated on 256 seeded images: from ``--data`` when given, N(0, 1) otherwise; latency does not
depend on where the calibration ranges come from), and exported to each target of ``--targets``
(default: every registered target whose extra is installed; export/targets: each file verified
in its own runtime against PyTorch on 32 seeded N(0, 1) inputs, the parity figures are reported
with its size). The back ends are then timed at one
batch size and one intra-op thread (a phone's usual setting) in interleaved rounds (eager, fp32,
int8, each target, eager, ...) so that a load change on this shared machine hits all alike; each round
is a warm-up then >= runs/rounds timed forwards and >= min-time/rounds seconds. Reported: p50 and
mean of all timed forwards per back end, and the ratios of the medians:
eager/fp32 (what exporting buys), fp32/int8 (what quantizing buys) and onnxruntime fp32 over each
target's runtime (what shipping that format buys), on the wall clock and
on the calling thread's CPU time (at one thread all work runs on it; CPU time leaves out the
time the thread sat descheduled, which on a loaded shared machine stretches long forwards more
than short ones and so distorts wall-clock ratios).
Also: the multiply-adds per second each back end achieves (fvcore FLOPs x batch / p50) and its
share of the CPU's nominal peak at that thread count (export/peak.py: cores x clock x the vector
unit's multiply-adds per cycle), so the headroom is visible.
Writes benchmarks/results/export_latency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.models import create  # noqa: E402
from export.latency import Samples, Timing, machine_info, measure, onnx_runner, sample, summarize, torch_runner  # noqa: E402
from export.parity import random_inputs  # noqa: E402
from export.peak import achieved, detect_peak  # noqa: E402
from export.runtime import all_cores  # noqa: E402
from export.quantize import quantize_int8  # noqa: E402
from export.targets import export_targets, get_target, target_names  # noqa: E402

SHAPE = (3, 32, 32)


def calibration_images(spec: str | None, n: int = 256) -> torch.Tensor:
    if spec is None:
        return random_inputs(SHAPE, n, seed=1)
    from compressor.data import load_source

    return load_source(spec, seed=0).sample("train", n, seed=0).x


def bench_student(name: str, folder: Path, calibration: torch.Tensor, args, targets: list[str]) -> dict:
    torch.manual_seed(0)
    model = create(name, num_classes=100).eval()
    int8 = folder / f"{name}.int8.onnx"
    exported = export_targets(model, folder / f"{name}.onnx", ["onnx", *targets], input_shape=SHAPE, log=None)
    report = exported["onnx"]
    fp32 = Path(report.path)
    quantize_int8(fp32, int8, [calibration])
    timing = Timing(warmup=0, min_runs=max(1, args.runs // args.rounds), min_time=args.min_time / args.rounds)
    warm = Timing(warmup=args.warmup, min_runs=1, min_time=0.0)
    times: dict[str, Samples] = {k: Samples() for k in ("eager", "fp32", "int8", *targets)}
    providers: dict[str, str] = {}
    with torch_runner(model, SHAPE, batch=args.batch, threads=args.threads, device="cpu") as (eager, device):
        runners = {
            "eager": (eager, device),
            "fp32": onnx_runner(fp32, batch=args.batch, threads=args.threads, provider="CPUExecutionProvider",
                                input_shape=SHAPE),
            "int8": onnx_runner(int8, batch=args.batch, threads=args.threads, provider="CPUExecutionProvider",
                                input_shape=SHAPE),
            **{t: get_target(t).runner(Path(exported[t].path), batch=args.batch, threads=args.threads,
                                       input_shape=SHAPE) for t in targets},
        }
        for label, (run, provider) in runners.items():
            measure(run, warm)
            providers[label] = provider
        for _ in range(args.rounds):
            for label, (run, _) in runners.items():
                got = sample(run, timing)
                times[label].wall += got.wall
                times[label].cpu += got.cpu
    backends = {"eager": "pytorch", "fp32": "onnxruntime", "int8": "onnxruntime",
                **{t: get_target(t).runtime for t in targets}}
    stats = {
        label: summarize(t.wall, label=label, backend=backends[label],
                         provider=providers[label], batch=args.batch, threads=args.threads, warmup=args.warmup,
                         cpu_times=t.cpu)
        for label, t in times.items()
    }
    compute = achieved(stats.values(), report.metadata.flops, detect_peak(all_cores()), batch=args.batch)
    e, f, q = (stats[k].p50_ms for k in ("eager", "fp32", "int8"))
    ec, fc, qc = (stats[k].cpu_p50_ms for k in ("eager", "fp32", "int8"))
    return {
        "model": name,
        "exporter": report.details["export"]["exporter"],
        "parity_max_abs_diff": report.parity.max_abs_diff,
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
        "stats": {k: v.to_dict() for k, v in stats.items()},
        "eager_over_fp32": e / f,
        "fp32_over_int8": f / q,
        "eager_over_int8": e / q,
        "cpu_eager_over_fp32": ec / fc,
        "cpu_fp32_over_int8": fc / qc,
        "cpu_eager_over_int8": ec / qc,
        "macs_per_image": report.metadata.flops,
        "compute": {c.label: c.to_dict() for c in compute},
        "targets": {t: {"path_suffix": get_target(t).suffix, "bytes": exported[t].bytes, "converter": exported[t].converter,
                        "parity_max_abs_diff": exported[t].parity.max_abs_diff,
                        "parity_top1_agreement": exported[t].parity.top1_agreement,
                        "parity_samples": exported[t].parity.samples, "convert_seconds": exported[t].seconds,
                        "p50_ms": stats[t].p50_ms, "mean_ms": stats[t].mean_ms, "cpu_p50_ms": stats[t].cpu_p50_ms,
                        "fp32_over_target": f / stats[t].p50_ms,
                        "cpu_fp32_over_target": fc / stats[t].cpu_p50_ms} for t in targets},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,resnet8x4,wrn_16_2,MobileNetV2,ShuffleV2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200, help="minimum timed forwards per back end, over all rounds")
    parser.add_argument("--min-time", type=float, default=1.0, help="minimum timed seconds per back end, over all rounds")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--data", default=None, help="calibrate int8 on this data's training split (default: N(0,1))")
    parser.add_argument("--targets", default=None,
                        help="export targets beside ONNX, comma-separated (default: every installed one)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "export_latency.json"))
    args = parser.parse_args()
    targets = [get_target(t).name for t in args.targets.split(",")] if args.targets else [
        t for t in target_names() if t != "onnx" and not get_target(t).missing()]
    fixed = [t for t in targets if get_target(t).batch not in (None, args.batch)]
    if fixed:
        print(f"note: {', '.join(fixed)} take batch {get_target(fixed[0]).batch} only: left out at batch {args.batch}")
        targets = [t for t in targets if t not in fixed]
    calibration = calibration_images(args.data)
    rows = []
    header = (f"{'model':<12} {'eager p50':>10} {'fp32 p50':>9} {'int8 p50':>9} {'eager mean':>11} {'fp32 mean':>10} "
              f"{'int8 mean':>10} {'eager/fp32':>11} {'fp32/int8':>10} {'eager/int8':>11} {'cpu: e/fp32':>12} "
              f"{'fp32/int8':>10}")
    print(f"batch {args.batch}, {args.threads} intra-op thread(s), 3x32x32, wall times in ms; ratios of medians "
          "(wall clock, then calling-thread CPU time)")
    peak = detect_peak(all_cores())
    print(f"nominal peak: {peak.describe() if peak else 'unknown'}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="kdcompress-bench-") as tmp:
        for name in args.models.split(","):
            row = bench_student(name, Path(tmp), calibration, args, targets)
            rows.append(row)
            s = row["stats"]
            print(f"{name:<12} {s['eager']['p50_ms']:>10.3f} {s['fp32']['p50_ms']:>9.3f} {s['int8']['p50_ms']:>9.3f} "
                  f"{s['eager']['mean_ms']:>11.3f} {s['fp32']['mean_ms']:>10.3f} {s['int8']['mean_ms']:>10.3f} "
                  f"{row['eager_over_fp32']:>10.2f}x {row['fp32_over_int8']:>9.2f}x {row['eager_over_int8']:>10.2f}x "
                  f"{row['cpu_eager_over_fp32']:>11.2f}x {row['cpu_fp32_over_int8']:>9.2f}x", flush=True)
            shares = [f"{label} {c['macs_per_s'] / 1e9:.2f} G/s" + (f" ({100 * c['share_of_peak']:.1f}%)"
                                                                    if c["share_of_peak"] else "")
                      for label, c in row["compute"].items()]
            print(f"{'':<12} multiply-adds/s (share of the {args.threads}-thread peak): {', '.join(shares)}")
            for t, r in row["targets"].items():
                print(f"{'':<12} {t:<10} p50 {r['p50_ms']:.3f} ms  mean {r['mean_ms']:.3f}  {r['bytes'] / 1e6:.2f} MB  "
                      f"parity max|diff| {r['parity_max_abs_diff']:.1e}, top-1 {100 * r['parity_top1_agreement']:.0f}%  "
                      f"onnxruntime fp32 / {t}: {r['fp32_over_target']:.2f}x (cpu {r['cpu_fp32_over_target']:.2f}x)  "
                      f"[{r['converter']}]", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "args": vars(args), "targets": targets,
                               "method": __doc__.strip(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
