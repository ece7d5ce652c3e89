"""channels_last against contiguous (NCHW) tensors on CPU: images/s of the trainer's real step.

    PYTHONPATH=$PWD python benchmarks/memory_format.py [--threads 1] [--repeats 5] [--seconds 1.5]

Each workload is built twice from the same seed, identical but for the memory format, which
:class:`compressor.trainer.precision.Precision` applies exactly as the trainer does
(``prepare_module`` on the scheme, ``prepare_input`` on every batch). A training arm is the loop's
step (``compressor/trainer/loop.py``): the scheme's forward on the batch (``Vanilla`` for one model,
``Offline`` with the named loss plus CE for a teacher -> student pair), the summed loss, backward,
an SGD step (momentum, Nesterov, weight decay), ``after_step``. An evaluation arm is the deployable
alone in eval mode under ``no_grad``, at the trainer's evaluation batch (4 x the training batch).
Inputs are random tensors of the dataset's shape (what the layout costs does not depend on pixels).

Workloads: the bundled digits (1x8x8, batch 32), Fashion-MNIST size (1x28x28, batch 128), CIFAR
size (3x32x32, batch 64, 100 classes) and 64x64 image folders (batch 32, 200 classes), with the
zoo's models that the project's recipes and benchmarks train there, and a few wide nets whose last
stages run 3x3 convs of 256-512 channels on maps of 4x4 or smaller; see ``WORKLOADS``.

Timing: each repeat runs every workload's two arms back to back, the order alternating between
repeats, so drift in the machine's speed hits both alike. An arm takes ``--warmup`` untimed steps,
then a number of timed steps fixed per workload in the first repeat (about ``--seconds`` of its
contiguous step, at least 3). The figure is the median over repeats of images/s, and the speed-up
is the median of the per-repeat ratios channels_last / contiguous (1.10 = 10% faster). With one
thread the clock is the process's CPU time (``--clock auto``), which on a machine shared with
other processes does not count the time the process waited for a core; the load average before
and after is recorded. Writes benchmarks/results/memory_format.json.

Where the difference comes from (``--convs``): one ``nn.Conv2d`` (C -> C channels, kernel 3 or 1,
batch 64) on a C x S x S map, forward + backward and no-grad forward, both formats, interleaved,
median of ``--repeats``; writes benchmarks/results/memory_format_convs.json.

    PYTHONPATH=$PWD python benchmarks/memory_format.py --convs [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.batch import Batch  # noqa: E402
from compressor.models import create  # noqa: E402
from compressor.schemes import Vanilla  # noqa: E402
from compressor.schemes.base import Scheme  # noqa: E402
from compressor.schemes.offline import Offline, freeze  # noqa: E402
from compressor.trainer.precision import Precision  # noqa: E402

Step = Callable[[Batch], None]
DIGITS, FMNIST, CIFAR, IMG64, IMG224 = (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 224, 224)


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, int, int]
    batch: int
    classes: int
    student: str
    teacher: str | None = None  # None: the student trained alone on its labels (Vanilla)
    method: str = "hinton"  # the knowledge loss of a teacher -> student pair
    mode: str = "train"  # train | eval (the student alone, no_grad, batch x 4)


WORKLOADS = [
    # digits: the teacher, the smallest zoo student, the width-solved student of the README's main job, and that KD
    Workload("digits resnet110", DIGITS, 32, 10, "resnet110"),
    Workload("digits resnet8", DIGITS, 32, 10, "resnet8"),
    Workload("digits resnet_d26_w0.53", DIGITS, 32, 10, "resnet_d26_w0.53"),
    Workload("digits resnet110->resnet_d26_w0.53 kd", DIGITS, 32, 10, "resnet_d26_w0.53", "resnet110"),
    # ... and wide nets whose 3x3 convs of 256-512 channels run on maps of 2x2 or smaller there
    Workload("digits resnet32x4", DIGITS, 32, 10, "resnet32x4"),
    Workload("digits vgg8", DIGITS, 32, 10, "vgg8"),
    # Fashion-MNIST size: benchmarks/fashion_mnist.py's teacher and a budget-sized student
    Workload("fmnist resnet20", FMNIST, 128, 10, "resnet20"),
    Workload("fmnist resnet_d8_w0.32", FMNIST, 128, 10, "resnet_d8_w0.32"),
    # CIFAR size: the KD benchmark's pairs (RepDistiller / CRD table), Hinton KD plus CE
    Workload("cifar resnet56->resnet20 kd", CIFAR, 64, 100, "resnet20", "resnet56"),
    Workload("cifar resnet56->resnet20 semckd", CIFAR, 64, 100, "resnet20", "resnet56", "semckd"),
    Workload("cifar wrn_40_2->wrn_16_2 kd", CIFAR, 64, 100, "wrn_16_2", "wrn_40_2"),
    Workload("cifar resnet32x4->ShuffleV2 kd", CIFAR, 64, 100, "ShuffleV2", "resnet32x4"),
    Workload("cifar vgg13->MobileNetV2 kd", CIFAR, 64, 100, "MobileNetV2", "vgg13"),
    Workload("cifar vgg13->vgg8 kd", CIFAR, 64, 100, "vgg8", "vgg13"),
    Workload("cifar ResNet18", CIFAR, 64, 100, "ResNet18"),  # 512 channels at 4x4 in its last stage
    # image folders at 64x64 (Tiny-ImageNet size): torchvision models, whose last stages run at 2x2-4x4 there
    Workload("img64 tv:resnet18", IMG64, 32, 200, "tv:resnet18"),
    Workload("img64 tv:mobilenet_v2", IMG64, 32, 200, "tv:mobilenet_v2"),
    # ImageNet size, where those stages run at 7x7-14x14 (slow at 1 thread: run it alone with --only img224)
    Workload("img224 tv:resnet18", IMG224, 16, 1000, "tv:resnet18"),
    # evaluation: no-grad forward of a deployable at the trainer's evaluation batch
    Workload("eval digits resnet110", DIGITS, 32, 10, "resnet110", mode="eval"),
    Workload("eval fmnist resnet20", FMNIST, 128, 10, "resnet20", mode="eval"),
    Workload("eval cifar resnet56", CIFAR, 64, 100, "resnet56", mode="eval"),
    Workload("eval cifar wrn_40_2", CIFAR, 64, 100, "wrn_40_2", mode="eval"),
]


def build_scheme(w: Workload) -> Scheme:
    torch.manual_seed(0)
    c = w.shape[0]
    student = create(w.student, num_classes=w.classes, in_chans=c)
    if w.teacher is None:
        return Vanilla(student)
    teacher = freeze(create(w.teacher, num_classes=w.classes, in_chans=c))
    return Offline(teacher, student, [(w.method, 1.0)], input_shape=w.shape, num_classes=w.classes,
                   num_train=50000, loss_options={"semckd": {"batch_size": w.batch}} if w.method == "semckd" else None)


def make_step(w: Workload, channels_last: bool) -> Step:
    """The trainer's step (or its evaluation pass) for ``w`` in one memory format."""
    precision = Precision(torch.device("cpu"), None, channels_last)
    scheme = build_scheme(w)
    precision.prepare_module(scheme)
    if w.mode == "eval":
        model = scheme.deployable().eval()

        def evaluate(b: Batch) -> None:
            with torch.no_grad():
                model(precision.prepare_input(b.x))

        return evaluate
    scheme.train()
    for module in scheme.frozen_modules():
        module.requires_grad_(False)
    opt = torch.optim.SGD(list(scheme.trainable_parameters()), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def step(b: Batch) -> None:
        losses = scheme(Batch(precision.prepare_input(b.x), b.y, b.index))
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheme.after_step()

    return step


def make_batches(w: Workload, count: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    n = w.batch * (4 if w.mode == "eval" else 1)
    return [Batch(torch.randn(n, *w.shape, generator=g), torch.randint(0, w.classes, (n,), generator=g),
                  torch.randint(0, 50000, (n,), generator=g)) for _ in range(count)]


def run_arm(step: Step, batches: list[Batch], warmup: int, steps: int,
            clock: Callable[[], float]) -> tuple[float, float]:
    """(images/s, seconds per step) of ``steps`` timed steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    images, t0 = 0, clock()
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step(b)
        images += b.x.shape[0]
    seconds = clock() - t0
    return images / seconds, seconds / steps


# (kernel, channels, map sides) of the --convs grid; cells over CONV_MACS multiply-adds are left out
CONV_GRID = [(3, [16, 64, 128, 256, 512], [2, 4, 8, 16, 32]), (1, [128, 256, 512, 1024], [1, 2, 4, 8])]
CONV_MACS = 4e9


def conv_step(kernel: int, channels: int, side: int, channels_last: bool, backward: bool) -> Step:
    """One conv's forward (+ backward to input and weights) on a batch of 64, in one memory format."""
    torch.manual_seed(0)
    precision = Precision(torch.device("cpu"), None, channels_last)
    conv = precision.prepare_module(torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2))
    x = precision.prepare_input(torch.randn(64, channels, side, side)).requires_grad_(backward)

    def step(_b: Batch) -> None:
        if backward:
            conv(x).sum().backward()
        else:
            with torch.no_grad():
                conv(x)

    return step


def conv_grid(args, clock: Callable[[], float]) -> list[dict]:
    dummy = [Batch(torch.empty(64, 0), torch.empty(0), None)]  # the step makes its own input
    cells = [(k, c, s) for k, cs, ss in CONV_GRID for c in cs for s in ss if 64 * c * c * k * k * s * s <= CONV_MACS]
    rows = []
    print(f"| kernel | channels | map   | fwd+bwd cl/contiguous time | no-grad fwd cl/contiguous time |")
    print(f"|--------|----------|-------|----------------------------|--------------------------------|")
    for k, c, s in cells:
        row = {"kernel": k, "channels": c, "map": f"{s}x{s}", "batch": 64}
        for mode, backward in (("fwd_bwd", True), ("fwd", False)):
            steps = {cl: conv_step(k, c, s, cl, backward) for cl in (False, True)}
            _, per_step = run_arm(steps[False], dummy, 1, 2, clock)
            n = max(3, round(0.15 / max(per_step, 1e-6)))
            ratios = []
            for r in range(args.repeats):
                got = {}
                for cl in ((False, True) if r % 2 == 0 else (True, False)):
                    got[cl] = run_arm(steps[cl], dummy, 1, n, clock)[1]
                ratios.append(got[True] / got[False])
            row[f"{mode}_time_ratio"] = statistics.median(ratios)
            row[f"{mode}_ratios"] = ratios
        rows.append(row)
        print(f"| {k:>6} | {c:>8} | {row['map']:<5} | {row['fwd_bwd_time_ratio']:>26.2f} "
              f"| {row['fwd_time_ratio']:>30.2f} |", flush=True)
    print("time ratio: channels_last time / contiguous time (below 1: channels_last is faster)")
    return rows


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="about this long per arm and repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each arm")
    parser.add_argument("--convs", action="store_true", help="time the single-conv grid instead of the workloads")
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings of workload names to run (default: all but img224)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: the process's CPU time; auto: cpu with one thread, else wall")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_format.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock_name = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({' '.join(cpu_flags())}), {args.threads} thread(s), "
          f"{clock_name} clock; load average before: {load_before[0]:.2f}", flush=True)
    if args.convs:
        out = Path(args.out).with_name("memory_format_convs.json")
        rows = conv_grid(args, clock)
        out.write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
                                   "clock": clock_name, "args": vars(args), "load_before": load_before,
                                   "load_after": os.getloadavg(), "rows": rows}, indent=1))
        print(f"wrote {out}")
        return
    chosen = [w for w in WORKLOADS if (args.only is None and "img224" not in w.name)
              or (args.only is not None and any(s in w.name for s in args.only.split(",")))]
    arms = {}
    for w in chosen:
        batches = make_batches(w, 4)
        arms[w.name] = (batches, {"contiguous": make_step(w, False), "channels_last": make_step(w, True)})
    steps_of: dict[str, int] = {}
    samples: dict[str, dict[str, list[float]]] = {w.name: {"contiguous": [], "channels_last": []} for w in chosen}
    for r in range(args.repeats):
        for w in chosen:
            batches, steps = arms[w.name]
            order = ["contiguous", "channels_last"] if r % 2 == 0 else ["channels_last", "contiguous"]
            if w.name not in steps_of:  # calibrate on the contiguous step, once
                _, per_step = run_arm(steps["contiguous"], batches, args.warmup, 2, clock)
                steps_of[w.name] = max(3, round(args.seconds / max(per_step, 1e-6)))
            for arm in order:
                ips, _ = run_arm(steps[arm], batches, args.warmup, steps_of[w.name], clock)
                samples[w.name][arm].append(ips)
        print(f"repeat {r + 1}/{args.repeats} done; load average {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    rows = []
    print(f"\n{args.threads} thread(s), {clock_name} clock, median of {args.repeats} repeats")
    print(f"| {'workload':<40} | {'input':>6} | {'batch':>5} | {'contiguous img/s':>16} | {'channels_last img/s':>19} "
          f"| {'speed-up':>8} | {'range':>11} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 7}|{'-' * 18}|{'-' * 21}|{'-' * 10}|{'-' * 13}|")
    for w in chosen:
        s = samples[w.name]
        ratios = [cl / co for co, cl in zip(s["contiguous"], s["channels_last"])]
        row = {"workload": w.name, "mode": w.mode, "input": "x".join(map(str, w.shape)),
               "batch": w.batch * (4 if w.mode == "eval" else 1), "teacher": w.teacher, "student": w.student,
               "method": w.method if w.teacher else None, "steps_per_arm": steps_of[w.name],
               "contiguous_img_s": statistics.median(s["contiguous"]),
               "channels_last_img_s": statistics.median(s["channels_last"]),
               "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
               "ratios": ratios, "samples": s}
        rows.append(row)
        print(f"| {w.name:<40} | {row['input']:>6} | {row['batch']:>5} | {row['contiguous_img_s']:>16.1f} "
              f"| {row['channels_last_img_s']:>19.1f} | {row['speedup']:>8.3f} "
              f"| {row['speedup_min']:.2f}-{row['speedup_max']:.2f} |")
    print(f"speed-up: median of per-repeat channels_last / contiguous; range: its min-max over repeats; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
                               "machine": platform.processor() or platform.machine(), "clock": clock_name,
                               "args": vars(args), "load_before": load_before, "load_after": load_after,
                               "rows": rows}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
