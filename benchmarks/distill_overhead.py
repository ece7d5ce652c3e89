"""Cost of each knowledge loss: images/s of one offline distillation step against its floor.

The floor is the least any offline distillation step must do: a student forward + backward +
optimizer step (cross-entropy only) plus a no-grad teacher forward. The method step is the
``Offline`` scheme's full step with that one loss (and CE): teacher and student through their
feature taps, the loss, backward over ``scheme.trainable_parameters()`` and an SGD step. Floor and
methods are timed interleaved (each repeat times the floor, then every method, in turn) so drift in
the machine's speed hits them alike; the figure is the median over repeats of images/s, and the
overhead ratio is floor img/s / method img/s (1.05 = 5% slower than the floor). All steps share one
randomly initialised teacher, and the labels are its predictions (see ``main``).

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
from compressor.models import create
from compressor.schemes.offline import Offline, freeze

# what a method does beyond the floor, for the methods the issue exempts from the 25% bound
EXTRA_WORK = {
    "bss": "attacks the teacher for boundary samples: up to 10 teacher forward+backward (to the input) passes "
           "on up to a quarter of the batch, then teacher and student forwards on them",
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
    student = create(args.student, num_classes=args.classes).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(batch: Batch) -> None:
        with torch.no_grad():
            teacher(batch.x)
        loss = F.cross_entropy(student(batch.x), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def method_step(args, method: str, teacher: torch.nn.Module) -> Callable[[Batch], None]:
    teacher = copy.deepcopy(teacher)
    student = create(args.student, num_classes=args.classes)
    scheme = Offline(teacher, student, [(method, 1.0)], input_shape=tuple(args.shape), num_classes=args.classes,
                     num_train=args.num_train, loss_options={"semckd": {"batch_size": args.batch}})
    scheme.bind_train_labels(torch.arange(args.num_train) % args.classes)  # balanced, as CIFAR's
    scheme.train()
    scheme.teacher.eval()
    opt = torch.optim.SGD(list(scheme.trainable_parameters()), lr=0.01, momentum=0.9)

    def step(batch: Batch) -> None:
        loss = sum(scheme(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def images_per_s(step: Callable[[Batch], None], batches: list[Batch], warmup: int) -> float:
    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    seconds = time.perf_counter() - t0
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
    parser.add_argument("--out", default="benchmarks/results/distill_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = args.methods or list_losses()
    teacher = freeze(create(args.teacher, num_classes=args.classes))
    batches = [make_batch(args.batch, tuple(args.shape), args.classes, args.num_train, i)
               for i in range(args.warmup + args.steps)]
    # labels are the teacher's own predictions, as for a trained teacher on its training data: BSS
    # attacks only the samples the teacher gets right, so random labels would hide its cost
    with torch.no_grad():
        batches = [b._replace(y=teacher(b.x).argmax(1)) for b in batches]
    steps = {"floor": floor_step(args, teacher), **{m: method_step(args, m, teacher) for m in methods}}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name, step in steps.items():
            rates[name].append(images_per_s(step, batches, args.warmup))
        print(f"repeat {r + 1}/{args.repeats}: floor {rates['floor'][-1]:.1f} img/s", flush=True)
    floor = statistics.median(rates["floor"])
    print(f"\n{args.teacher} -> {args.student}, {args.batch} x {'x'.join(map(str, args.shape))}, {args.classes} "
          f"classes, {args.threads} thread(s), median of {args.repeats} repeats x {args.steps} steps")
    print(f"| {'method':<8} | {'floor img/s':>11} | {'method img/s':>12} | {'overhead':>8} |")
    print(f"|{'-' * 10}|{'-' * 13}|{'-' * 14}|{'-' * 10}|")
    table = []
    for name in methods:
        rate = statistics.median(rates[name])
        ratio = floor / rate
        table.append({"method": name, "floor_img_s": floor, "method_img_s": rate, "overhead": ratio,
                      "samples": rates[name], "extra_work": EXTRA_WORK.get(name)})
        print(f"| {name:<8} | {floor:>11.1f} | {rate:>12.1f} | {ratio:>8.3f} |")
    for name, text in EXTRA_WORK.items():
        if name in methods:
            print(f"{name}: {text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "floor_samples": rates["floor"], "rows": table}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
