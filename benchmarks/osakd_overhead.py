"""OSAKD's cost over vanilla training: time per training step (forward, backward, SGD step).

Both schemes train the same architecture on the same batches; their steps are interleaved
(vanilla, OSAKD, vanilla, ...) so machine noise hits both alike, and the figure is the ratio of
the medians, measured in one run. OSAKD adds a softmax, one (batch x memory x classes) distance
matrix, a top-k and a small MSE per step; its memory is the paper's default 4096 outputs.

    PYTHONPATH=$PWD python benchmarks/osakd_overhead.py --arch resnet20 --classes 100 --shape 3x32x32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compressor.batch import Batch
from compressor.schemes import SchemeRequest, build_scheme


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shape", default="3x32x32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    num_train = 50_000
    torch.manual_seed(0)
    schemes = {
        "vanilla": build_scheme("vanilla", SchemeRequest(args.arch, args.classes, shape, num_train)),
        "osakd": build_scheme("osakd", SchemeRequest(args.arch, args.classes, shape, num_train,
                                                     options={"memory": args.memory})),
    }
    optimizers = {}
    for name, scheme in schemes.items():
        scheme.to(device).train()
        optimizers[name] = torch.optim.SGD(scheme.trainable_parameters(), lr=0.01, momentum=0.9)
    times: dict[str, list[float]] = {name: [] for name in schemes}
    for step in range(args.warmup + args.steps):
        index = torch.randint(0, num_train, (args.batch,), device=device)
        batch = Batch(torch.randn(args.batch, *shape, device=device), index % args.classes, index)
        for name, scheme in schemes.items():
            _sync(device)
            t0 = time.perf_counter()
            loss = sum(scheme(batch).values())
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            _sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    vanilla, osakd = statistics.median(times["vanilla"]), statistics.median(times["osakd"])
    result = {
        "arch": args.arch, "classes": args.classes, "shape": list(shape), "batch": args.batch,
        "memory": args.memory, "device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
        "vanilla_ms": 1000 * vanilla, "osakd_ms": 1000 * osakd, "ratio": osakd / vanilla,
        "overhead_pct": 100 * (osakd / vanilla - 1),
    }
    print(f"{args.arch}, {args.classes} classes, input {args.shape}, batch {args.batch}, memory {args.memory}, "
          f"{device} ({result['threads']} threads), median of {args.steps} interleaved steps:")
    print(f"  vanilla {result['vanilla_ms']:.1f} ms/step   osakd {result['osakd_ms']:.1f} ms/step   "
          f"ratio {result['ratio']:.3f} ({result['overhead_pct']:+.1f}%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
