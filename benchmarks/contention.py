"""Training images/s while other CPU-bound processes share the machine: the thread policy
(compressor/threads.py) against torch's default thread count, in one run.

    PYTHONPATH=$PWD python benchmarks/contention.py [--steps 60] [--max-seconds 10] [--competitors 0,1,2,1late]

Workloads (each a real training step through the schemes the trainer runs):
  * teacher: ResNet-110 on the bundled digits (1x8x8, batch 32, the digits protocol's SGD with
    Nesterov and gradient clip 1), as `kdcompress train --arch resnet110` trains it;
  * kd32:    ResNet-56 -> ResNet-20 offline Hinton KD (plus CE) on synthetic 3x32x32 images,
    batch 64, 100 classes (the CIFAR benchmark's pair and batch).
For 0, 1 and 2 competitors (``python -c "while True: pass"``, started before and killed after each
setting), and for one competitor that starts a third of the way into each arm's timed steps
(``1late``: a run that began on an idle machine and must notice), both arms run, order alternating:
  * policy:  the :class:`ThreadGovernor` as ``fit`` applies it (work per op measured, other runnable
    tasks re-checked every 2 s while it polls each step);
  * default: torch's default thread count (the behaviour before the policy).
An arm takes ``--warmup`` untimed steps, then ``--steps`` timed ones, or stops at ``--max-seconds``
(a collapsed arm would otherwise run for minutes). Each figure is also given as a share of the
default arm's quiet figure (the speed today on an idle machine). Goal (issue 17): with one
competitor on 2 cores the policy keeps >= 0.45x of that; quiet, it is no slower than the default.
The machine's own background load is not controlled: say it when quoting figures (the load
average is printed). Writes benchmarks/results/contention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.batch import Batch  # noqa: E402
from compressor.models import create  # noqa: E402
from compressor.schemes import Vanilla  # noqa: E402
from compressor.schemes.offline import Offline, freeze  # noqa: E402
from compressor.threads import ThreadGovernor, measure_work  # noqa: E402

Step = Callable[[Batch], None]


def teacher_workload(batch: int) -> tuple[torch.nn.Module, Step, Iterator[Batch], tuple[int, ...]]:
    from compressor.data import load_source

    source = load_source("digits")
    torch.manual_seed(0)
    scheme = Vanilla(create("resnet110", num_classes=10, in_chans=1)).train()
    opt = torch.optim.SGD(scheme.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(b: Batch) -> None:
        loss = sum(scheme(b).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scheme.parameters(), 1.0)
        opt.step()

    def batches() -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from source.loader("train", batch, shuffle=True, augment=True, epoch=epoch)
            epoch += 1

    return scheme.model, step, batches(), (1, 8, 8)


def kd32_workload(batch: int) -> tuple[torch.nn.Module, Step, Iterator[Batch], tuple[int, ...]]:
    torch.manual_seed(0)
    shape, classes = (3, 32, 32), 100
    teacher = freeze(create("resnet56", num_classes=classes))
    scheme = Offline(teacher, create("resnet20", num_classes=classes), [("hinton", 1.0)], input_shape=shape,
                     num_classes=classes, num_train=50000)
    scheme.train()
    opt = torch.optim.SGD(list(scheme.trainable_parameters()), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(b: Batch) -> None:
        loss = sum(scheme(b).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(0)
        pool = [Batch(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g),
                      torch.randint(0, 50000, (batch,), generator=g)) for _ in range(4)]
        while True:
            yield from pool

    return scheme.student, step, batches(), shape


WORKLOADS = {"teacher": (teacher_workload, 32), "kd32": (kd32_workload, 64)}


def run_arm(step: Step, batches: Iterator[Batch], args, governor: ThreadGovernor | None,
            late: int = 0) -> tuple[float, int]:
    """(images/s, threads at the end) of ``--steps`` timed steps or ``--max-seconds``; ``late``
    competitors start a third of the way in and are stopped at the end."""
    for _ in range(args.warmup):
        step(next(batches))
    images, t0, procs = 0, time.perf_counter(), []
    try:
        for i in range(args.steps):
            if late and i == args.steps // 3:
                procs = start_competitors(late, settle=False)
            if governor is not None:
                governor.poll()
            b = next(batches)
            step(b)
            images += b.y.shape[0]
            if time.perf_counter() - t0 > args.max_seconds:
                break
        return images / (time.perf_counter() - t0), torch.get_num_threads()
    finally:
        stop(procs)


def start_competitors(n: int, settle: bool = True) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    if settle:
        time.sleep(0.5)  # let them become runnable before an arm decides
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="teacher,kd32")
    parser.add_argument("--competitors", default="0,1,2,1late")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="cut an arm after this many seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "contention.json"))
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    settings = [(int(c.removesuffix("late")), c.endswith("late")) for c in args.competitors.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, default {default_threads} threads; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.workloads.split(","):
        build, batch = WORKLOADS[name]
        model, step, batches, shape = build(batch)
        work = measure_work(model, shape, batch)
        for k, (n, late) in enumerate(settings):
            procs = start_competitors(0 if late else n)
            try:
                got: dict[str, tuple[float, int]] = {}
                lines: list[str] = []
                arms = ["policy", "default"] if k % 2 == 0 else ["default", "policy"]
                for arm in arms:
                    torch.set_num_threads(default_threads)
                    if arm == "policy":
                        with ThreadGovernor(work, say=lines.append) as governor:
                            got[arm] = run_arm(step, batches, args, governor, late=n if late else 0)
                        print(f"  {name}, {n}{' late' if late else ''} competitor(s): {lines[0]}" + (f" (+{len(lines) - 1} change(s))"
                                                                            if len(lines) > 1 else ""), flush=True)
                    else:
                        got[arm] = run_arm(step, batches, args, None, late=n if late else 0)
            finally:
                stop(procs)
            rows.append({"workload": name, "competitors": n, "late": late, "batch": batch,
                         "policy_img_s": got["policy"][0], "policy_threads": got["policy"][1],
                         "default_img_s": got["default"][0], "default_threads": got["default"][1], "policy_choices": lines,
                         "load_after": os.getloadavg()[0]})
            print(f"{name:<8} {n}{' late' if late else ''} competitor(s): policy {got['policy'][0]:8.1f} img/s ({got['policy'][1]} thr)  "
                  f"default {got['default'][0]:8.1f} img/s ({got['default'][1]} thr)", flush=True)
    quiet = {r["workload"]: r["default_img_s"] for r in rows if r["competitors"] == 0 and not r["late"]}
    print(f"\n| workload | competitors | policy img/s | default img/s | policy / quiet | default / quiet |")
    print(f"|----------|-------------|--------------|---------------|----------------|-----------------|")
    for r in rows:
        q = quiet.get(r["workload"])
        r["policy_vs_quiet"] = r["policy_img_s"] / q if q else None
        r["default_vs_quiet"] = r["default_img_s"] / q if q else None
        shown = [f"{v:.2f}" if v is not None else "-" for v in (r["policy_vs_quiet"], r["default_vs_quiet"])]
        who = f"{r['competitors']}{' late' if r['late'] else ''}"
        print(f"| {r['workload']:<8} | {who:>11} | {r['policy_img_s']:>12.1f} | {r['default_img_s']:>13.1f} "
              f"| {shown[0]:>14} | {shown[1]:>15} |")
    print("(quiet = the default arm with 0 competitors; background load of the machine not controlled)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "default_threads": default_threads,
                               "args": vars(args), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
