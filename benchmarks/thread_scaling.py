"""What one more intra-op thread buys a training step on an idle machine, by the size of the
model's largest op: the calibration behind ``QUIET_MACS_PER_THREAD`` in compressor/threads.py.

    PYTHONPATH=$PWD python benchmarks/thread_scaling.py [--repeats 3] [--seconds 2] [--threads 1,2]

For each case (the digits models at batch 32, the README's student, Fashion-MNIST sizes at batch
128) one SGD step with cross-entropy on fixed random inputs is timed by the wall clock at each
thread count, the counts interleaved within each repeat; the figure is the best of the repeats
(images/s), and the speed-up is each count's figure over one thread's. Run it only on an idle
machine: a second thread on a shared core is the collapse the policy avoids, not its calibration.
Writes benchmarks/results/thread_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.models import create  # noqa: E402
from compressor.threads import measure_work  # noqa: E402

CASES = [("resnet_d26_w0.53", (1, 8, 8), 32), ("resnet8", (1, 8, 8), 32), ("resnet110", (1, 8, 8), 32),
         ("resnet56", (1, 8, 8), 64), ("resnet110", (1, 8, 8), 128), ("resnet_d8_w0.32", (1, 28, 28), 128),
         ("resnet8", (1, 28, 28), 128), ("resnet20", (1, 28, 28), 128)]


def images_per_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per count per repeat")
    parser.add_argument("--threads", default="1,2", help="thread counts, the first is the reference")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "thread_scaling.json"))
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for arch, shape, batch in CASES:
        torch.manual_seed(0)
        model = create(arch, num_classes=10, in_chans=shape[0]).train()
        work = measure_work(model, shape, batch)
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        best = {t: 0.0 for t in counts}
        for _ in range(args.repeats):
            for t in counts:
                best[t] = max(best[t], images_per_s(model, x, y, t, args.seconds))
        row = {"arch": arch, "input": "x".join(map(str, shape)), "batch": batch, "largest_op_macs": work.macs,
               "images_per_s": {str(t): best[t] for t in counts},
               "speedup": {str(t): best[t] / best[counts[0]] for t in counts}}
        rows.append(row)
        print(f"{arch:<18} {row['input']:<7} batch {batch:<4} largest op {work.macs / 1e6:7.1f}M  "
              + "  ".join(f"{t} thr {best[t]:7.0f} img/s ({row['speedup'][str(t)]:.2f}x)" for t in counts), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "args": vars(args),
                               "load_after": os.getloadavg()[0], "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
