"""Overhead of feature taps over a plain forward (and forward+backward), same run, as ratios.

    python benchmarks/feature_taps.py [--models resnet20,resnet32x4,...] [--batch 64] [--repeats 7]

For each model: median time of a plain ``model(x)`` and of ``FeatureTaps(model)(x)`` over
interleaved repeats; prints the ratio (1.00 = free) and writes benchmarks/results/feature_taps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.features import FeatureTaps  # noqa: E402
from compressor.models import create  # noqa: E402


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench(name: str, batch: int, repeats: int, iters: int, backward: bool) -> dict:
    model = create(name, num_classes=100)
    x = torch.randn(batch, 3, 32, 32)
    taps = FeatureTaps(model, (3, 32, 32))

    def plain():
        out = model(x)
        if backward:
            out.sum().backward()

    def tapped():
        out = taps(x)
        if backward:
            out.logits.sum().backward()

    model.train(backward)
    for fn in (plain, tapped):  # warm-up
        _time(fn, 2)
    # hooks are removed for the plain timing so both see the same module
    plain_t, tapped_t = [], []
    for _ in range(repeats):
        taps.remove()
        plain_t.append(_time(plain, iters))
        taps = FeatureTaps(model, (3, 32, 32))
        tapped_t.append(_time(tapped, iters))
    p, t = statistics.median(plain_t), statistics.median(tapped_t)
    return {"model": name, "batch": batch, "backward": backward, "plain_ms": p * 1e3, "tapped_ms": t * 1e3, "ratio": t / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet20,resnet8x4,wrn_16_2,MobileNetV2,ShuffleV2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'model':<14} {'mode':<9} {'plain ms':>9} {'tapped ms':>10} {'ratio':>7}")
    for name in args.models.split(","):
        for backward in (False, True):
            r = bench(name, args.batch, args.repeats, args.iters, backward)
            rows.append(r)
            mode = "fwd+bwd" if backward else "fwd"
            print(f"{name:<14} {mode:<9} {r['plain_ms']:>9.2f} {r['tapped_ms']:>10.2f} {r['ratio']:>7.3f}")
    out = Path(__file__).parent / "results" / "feature_taps.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
