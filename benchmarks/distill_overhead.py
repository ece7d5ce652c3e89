"""Cost of each knowledge loss: images/s of one offline distillation step against its floor.

The floor is the least any offline distillation step must do: a student forward + backward +
optimizer step (cross-entropy only) plus a no-grad teacher forward. The method step is the
``Offline`` scheme's full step with that one loss (and CE): teacher and student through their
feature taps, the loss, backward over ``scheme.trainable_parameters()`` and an SGD step. Floor and
methods are timed interleaved (each repeat times the floor, then every method, in turn) so drift in
the machine's speed hits them alike; the figure is the median over repeats of images/s, and the
overhead ratio is floor img/s / method img/s (1.05 = 5% slower than the floor). All steps share one
randomly initialised teacher, and the labels are its predictions (see ``main``).

Where a method's own definition adds work that no implementation can skip, the run also times that
work alone on top of the floor, interleaved with the rest, as the method's own floor:

* ``semckd``: its 9 projections (1x1-3x3-1x1 convs with BN/ReLU from every student stage to every
  teacher stage, as the paper and the official code define them), forward and backward;
* ``bss``: the attack's teacher passes (forward, and backward to the input for the attack steps)
  at the batch sizes the loss really ran in the method step just before, then the student's
  forward and backward on the boundary samples.

Models and images are laid out as the trainer lays them out (``--memory-format auto``: channels_last
for conv nets on CPU unless the rule in compressor/trainer/precision.py finds a conv it slows);
``contiguous`` gives the figures of the layout used before that rule.

With one thread the clock is the process's CPU time (``--clock auto``): on a machine shared with
other processes it does not count the time the process waited for a core.

    PYTHONPATH=$PWD python benchmarks/distill_overhead.py --repeats 5 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.knowledge import list_losses
from compressor.knowledge._stages import pool_to, smaller_size
from compressor.models import create
from compressor.schemes.offline import Offline, freeze
from compressor.trainer.precision import slow_conv_on_cpu

# what a method does beyond the floor, for the methods the issue exempts from the 25% bound
EXTRA_WORK = {
    "bss": "attacks the teacher for boundary samples: up to 10 teacher forward+backward (to the input) passes "
           "on up to a quarter of the batch (each on the samples the teacher still puts in their class), then "
           "teacher and student forwards on them",
    "semckd": "9 projections (1x1-3x3-1x1 convs with BN/ReLU, bottleneck twice the teacher's channels) from "
              "every student stage to every teacher stage, forward and backward, plus the attention",
    "crd": "projection heads plus a negative-sample memory: 16384 negatives per anchor, drawn from the other "
           "classes without replacement (RepDistiller's exact mode), scored against the embeddings, and the "
           "memory update",
}


def make_batch(batch: int, shape: tuple[int, ...], classes: int, num_train: int, step: int) -> Batch:
    g = torch.Generator().manual_seed(step)
    return Batch(x=torch.randn(batch, *shape, generator=g), y=torch.randint(0, classes, (batch,), generator=g),
                 index=torch.randint(0, num_train, (batch,), generator=g))


def floor_step(args, teacher: torch.nn.Module) -> Callable[[Batch], None]:
    teacher = freeze(copy.deepcopy(teacher))
    student = create(args.student, num_classes=args.classes).train().to(memory_format=args.layout)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(batch: Batch) -> None:
        with torch.no_grad():
            teacher(batch.x)
        loss = F.cross_entropy(student(batch.x), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def offline_scheme(args, method: str, teacher: torch.nn.Module) -> Offline:
    student = create(args.student, num_classes=args.classes)
    scheme = Offline(copy.deepcopy(teacher), student, [(method, 1.0)], input_shape=tuple(args.shape),
                     num_classes=args.classes, num_train=args.num_train,
                     loss_options={"semckd": {"batch_size": args.batch}})
    scheme.bind_train_labels(torch.arange(args.num_train) % args.classes)  # balanced, as CIFAR's
    scheme.to(memory_format=args.layout)
    scheme.train()
    scheme.teacher.eval()
    return scheme


def method_step(args, method: str, teacher: torch.nn.Module, passes: list | None = None) -> Callable[[Batch], None]:
    """The Offline scheme's step with one loss; ``passes`` (BSS) receives, per step, the extra model
    passes the loss ran: ("teacher", batch size, with gradient) and ("student", batch size)."""
    scheme = offline_scheme(args, method, teacher)
    opt = torch.optim.SGD(list(scheme.trainable_parameters()), lr=0.01, momentum=0.9)
    calls: list[tuple] = []
    if passes is not None:
        scheme.teacher.register_forward_hook(lambda m, i, o: calls.append(("teacher", o.shape[0], o.requires_grad)))
        scheme.student.register_forward_hook(lambda m, i, o: calls.append(("student", o.shape[0])))

    def step(batch: Batch) -> None:
        calls.clear()
        loss = sum(scheme(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if passes is not None:  # the first teacher and student calls are the floor's own
            extra = [c for i, c in enumerate(calls) if i > 1]
            passes.append(extra)

    return step


def semckd_work_step(args, teacher: torch.nn.Module) -> Callable[[Batch], None]:
    """The floor plus SemCKD's projections alone: what the method computes beyond the floor
    whatever the implementation (9 conv stacks forward and backward, a squared error each)."""
    scheme = offline_scheme(args, "semckd", teacher)
    projections = scheme.losses["semckd"].projections
    opt = torch.optim.SGD([*scheme.student.parameters(), *projections.parameters()], lr=0.01, momentum=0.9)

    def step(batch: Batch) -> None:
        with torch.no_grad():
            t_out = scheme.teacher_taps(batch.x)
        s_out = scheme.student_taps(batch.x)
        loss = F.cross_entropy(s_out.logits, batch.y)
        for row, s in zip(projections, s_out.features):
            for proj, t in zip(row, t_out.features):
                grid = smaller_size(tuple(s.shape[-2:]), tuple(t.shape[-2:]))
                loss = loss + (proj(pool_to(s, grid)) - pool_to(t, grid)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bss_work_step(args, teacher: torch.nn.Module, passes: list) -> Callable[[Batch], None]:
    """The floor plus the model passes the BSS step before it ran, alone: each attack step's teacher
    forward and backward to the input, the teacher's forward on the boundary samples, the student's
    forward (and its share of the backward) on them. ``passes`` holds them per step, as the method
    step recorded them; step i here replays the i-th recorded step."""
    teacher = freeze(copy.deepcopy(teacher))
    student = create(args.student, num_classes=args.classes).train().to(memory_format=args.layout)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    replayed = 0

    def step(batch: Batch) -> None:
        nonlocal replayed
        extra = passes[replayed % len(passes)] if passes else []
        replayed += 1
        with torch.no_grad():
            teacher(batch.x)
        loss = F.cross_entropy(student(batch.x), batch.y)
        for call in extra:
            x = batch.x[: call[1]]
            if call[0] == "teacher" and call[2]:
                x = x.clone().requires_grad_(True)
                torch.autograd.grad(teacher(x)[:, 0].sum(), x)
            elif call[0] == "teacher":
                with torch.no_grad():
                    teacher(x)
            else:
                loss = loss + student(x).logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def images_per_s(step: Callable[[Batch], None], batches: list[Batch], warmup: int,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    for b in batches[:warmup]:
        step(b)
    t0 = clock()
    for b in batches[warmup:]:
        step(b)
    seconds = clock() - t0
    return sum(b.x.shape[0] for b in batches[warmup:]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=50000, help="training-set size (CRD's memory)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each repeat")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered loss")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: the process's CPU time; auto: cpu with one thread, else wall")
    parser.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], default="auto",
                        help="auto: as the trainer chooses on this device")
    parser.add_argument("--out", default="benchmarks/results/distill_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock_name = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    methods = args.methods or list_losses()
    teacher = freeze(create(args.teacher, num_classes=args.classes))
    if args.memory_format == "auto":
        slow = slow_conv_on_cpu([teacher, create(args.student, num_classes=args.classes)], tuple(args.shape))
        args.memory_format = "contiguous" if slow else "channels_last"
    args.layout = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    teacher.to(memory_format=args.layout)
    batches = [make_batch(args.batch, tuple(args.shape), args.classes, args.num_train, i)
               for i in range(args.warmup + args.steps)]
    batches = [b._replace(x=b.x.contiguous(memory_format=args.layout)) for b in batches]
    # labels are the teacher's own predictions, as for a trained teacher on its training data: BSS
    # attacks only the samples the teacher gets right, so random labels would hide its cost
    with torch.no_grad():
        batches = [b._replace(y=teacher(b.x).argmax(1)) for b in batches]
    bss_passes: list[list[tuple]] = []
    steps = {"floor": floor_step(args, teacher)}
    own_floor = {}  # method -> the arm timing the work its definition adds, alone
    for m in methods:
        steps[m] = method_step(args, m, teacher, bss_passes if m == "bss" else None)
        if m == "semckd":
            own_floor[m] = "semckd: projections alone"
            steps[own_floor[m]] = semckd_work_step(args, teacher)
        if m == "bss":
            own_floor[m] = "bss: attack passes alone"
            steps[own_floor[m]] = bss_work_step(args, teacher, bss_passes)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name, step in steps.items():
            if name == "bss":
                bss_passes.clear()  # the replay arm that follows runs this repeat's passes
            rates[name].append(images_per_s(step, batches, args.warmup, clock))
        print(f"repeat {r + 1}/{args.repeats}: floor {rates['floor'][-1]:.1f} img/s", flush=True)
    floor = statistics.median(rates["floor"])
    print(f"\n{args.teacher} -> {args.student}, {args.batch} x {'x'.join(map(str, args.shape))}, {args.classes} "
          f"classes, {args.threads} thread(s), {args.memory_format}, {clock_name} clock, median of {args.repeats} repeats x {args.steps} steps")
    print(f"| {'method':<8} | {'floor img/s':>11} | {'method img/s':>12} | {'overhead':>8} | {'own floor':>9} "
          f"| {'vs own floor':>12} |")
    print(f"|{'-' * 10}|{'-' * 13}|{'-' * 14}|{'-' * 10}|{'-' * 11}|{'-' * 14}|")
    table = []
    for name in methods:
        rate = statistics.median(rates[name])
        ratio = floor / rate
        row = {"method": name, "floor_img_s": floor, "method_img_s": rate, "overhead": ratio,
               "samples": rates[name], "extra_work": EXTRA_WORK.get(name)}
        own = ""
        if name in own_floor:
            own_rate = statistics.median(rates[own_floor[name]])
            row.update(own_floor_img_s=own_rate, own_floor_overhead=floor / own_rate,
                       own_floor_samples=rates[own_floor[name]], vs_own_floor=own_rate / rate)
            own = f" {floor / own_rate:>9.3f} | {own_rate / rate:>12.3f} |"
        table.append(row)
        print(f"| {name:<8} | {floor:>11.1f} | {rate:>12.1f} | {ratio:>8.3f} |" + (own or f" {'':>9} | {'':>12} |"))
    print("own floor: floor img/s / img/s of the floor plus the work the method's definition adds, alone; "
          "vs own floor: the method's step time over that")
    for name, text in EXTRA_WORK.items():
        if name in methods:
            print(f"{name}: {text}")
    if "bss" in methods and bss_passes:
        sizes = [[c[1] for c in step if c[0] == "teacher" and c[2]] for step in bss_passes]
        print(f"bss attack passes per step, last repeat (boundary samples still moving at each attack step): {sizes}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    settings = {k: v for k, v in vars(args).items() if k != "layout"}  # memory_format says it
    tmp.write_text(json.dumps({"args": settings, "clock": clock_name, "floor_samples": rates["floor"],
                               "rows": table, "bss_passes": bss_passes}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
