"""Digits: offline distillation with every knowledge loss against the vanilla student.

One teacher (``--teacher``, resnet56 by default) is trained once with ``train_vanilla`` on digits
(the digits protocol, ``--teacher-epochs`` epochs, seed 0) and saved to ``--workdir``. Then, for
each seed, the vanilla student (``train_vanilla``) and the student distilled with each registered
loss (the offline scheme, built by ``build_scheme("offline", ...)`` and trained by ``fit``) train
with the same TrainConfig: the digits protocol with ``--epochs`` and that seed, the same data split
(``load_source(seed=seed)``) and the same ``seed_everything`` call, so rows differ only by the loss.
Each method runs at its paper's default weight plus CE at 1 (the method spec ``NAME``). The figure
is the test top-1 of the student chosen on the validation split; mean and sd over the seeds.
``--resume`` keeps the (row, seed) pairs already in ``--out``.

    PYTHONPATH=$PWD python benchmarks/distill_digits.py --epochs 15 --seeds 0 1 2 \
        --out benchmarks/results/distill_digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from compressor.checkpoint import load_model
from compressor.data import load_source
from compressor.knowledge import list_losses
from compressor.schemes import SchemeRequest, build_scheme
from compressor.trainer import NotLearning, TrainingDiverged, fit
from compressor.trainer.seeding import seed_everything
from recipes.training import train_config, train_vanilla

DATA = "digits"


def distil(method: str, teacher: torch.nn.Module, student: str, epochs: int, seed: int) -> dict:
    config = train_config(DATA, student, epochs=epochs, seed=seed, device="cpu", progress="off")
    seed_everything(seed)
    source = load_source(DATA, val_fraction=0.1, seed=seed)
    request = SchemeRequest(student, source.num_classes, tuple(source.input_shape), source.num_train,
                            teacher=teacher, method=method, batch_size=config.batch_size)
    scheme = build_scheme("offline", request)
    t0 = time.perf_counter()
    try:
        result = fit(scheme, source, config)
    except (TrainingDiverged, NotLearning) as err:  # a failed row, said in the table
        return {"test_top1": None, "diverged": str(err)[:200], "s_per_epoch": None}
    return {"test_top1": result.test.top1, "val_top1": result.best_value, "best_epoch": result.best_epoch,
            "s_per_epoch": (time.perf_counter() - t0) / epochs}


def vanilla(student: str, epochs: int, seed: int, workdir: Path) -> dict:
    t0 = time.perf_counter()
    result = train_vanilla(student, DATA, workdir / f"vanilla-{student}-s{seed}.pt", epochs=epochs, seed=seed,
                           device="cpu", progress="off")
    return {"test_top1": result.test.top1, "val_top1": result.best_value, "best_epoch": result.best_epoch,
            "s_per_epoch": (time.perf_counter() - t0) / epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--teacher-epochs", type=int, default=25, help="default: the digits protocol's 25")
    parser.add_argument("--student", default="resnet_d8_w0.5")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="benchmarks/results/distill_digits")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/distill_digits.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods or list_losses()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state: dict = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    rows: dict[str, list[dict]] = state.get("rows", {})

    def save(extra: dict | None = None) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "teacher": state.get("teacher"), "rows": rows,
                                   **(extra or {})}, indent=1))
        tmp.replace(out)

    teacher_path = workdir / f"teacher-{args.teacher}-e{args.teacher_epochs}.pt"
    if not teacher_path.is_file():
        t0 = time.perf_counter()
        result = train_vanilla(args.teacher, DATA, teacher_path, epochs=args.teacher_epochs, seed=0, device="cpu",
                               progress="off")
        state["teacher"] = {"arch": args.teacher, "epochs": args.teacher_epochs, "test_top1": result.test.top1,
                            "seconds": time.perf_counter() - t0}
        print(f"teacher {args.teacher}: test top-1 {result.test.top1:.2f}% "
              f"({state['teacher']['seconds']:.0f} s)", flush=True)
        save()
    teacher = load_model(teacher_path).model.eval()

    def keep(name: str, seed: int, record: dict) -> None:
        rows.setdefault(name, []).append({"seed": seed, **record})
        acc = record["test_top1"]
        print(f"{name:<10} seed {seed}: " + (f"test {acc:.2f}%  ({record['s_per_epoch']:.1f} s/epoch)"
                                             if acc is not None else "diverged"), flush=True)
        save()

    def todo(name: str, seed: int) -> bool:
        return not any(r["seed"] == seed for r in rows.get(name, []))

    for seed in args.seeds:
        if todo("vanilla", seed):
            keep("vanilla", seed, vanilla(args.student, args.epochs, seed, workdir))
        for method in methods:
            if todo(method, seed):
                keep(method, seed, distil(method, teacher, args.student, args.epochs, seed))

    base = [r["test_top1"] for r in rows.get("vanilla", []) if r["test_top1"] is not None]
    base_mean = statistics.mean(base) if base else None
    teacher_info = state.get("teacher") or {}
    print(f"\ndigits, teacher {args.teacher} ({args.teacher_epochs} epochs, test "
          f"{teacher_info.get('test_top1', float('nan')):.2f}%), student {args.student}, {args.epochs} epochs, "
          f"seeds {args.seeds}: test top-1 (%)")
    print(f"| {'method':<8} | {'n':>2} | {'mean':>6} | {'sd':>5} | {'vs vanilla':>10} | {'s/epoch':>7} |")
    print(f"|{'-' * 10}|{'-' * 4}|{'-' * 8}|{'-' * 7}|{'-' * 12}|{'-' * 9}|")
    summary = {}
    for name in ["vanilla", *methods]:
        records = rows.get(name, [])
        accs = [r["test_top1"] for r in records if r["test_top1"] is not None]
        if not accs:
            print(f"| {name:<8} | {len(records):>2} | {'-':>6} | {'-':>5} | {'-':>10} | {'-':>7} |")
            continue
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spe = statistics.mean(r["s_per_epoch"] for r in records if r["s_per_epoch"] is not None)
        delta = f"{mean - base_mean:+.2f}" if base_mean is not None and name != "vanilla" else "-"
        note = f" ({len(records) - len(accs)} diverged)" if len(accs) < len(records) else ""
        summary[name] = {"mean": mean, "sd": sd, "n": len(accs), "s_per_epoch": spe}
        print(f"| {name:<8} | {len(accs):>2} | {mean:>6.2f} | {sd:>5.2f} | {delta:>10} | {spe:>7.1f} |{note}")
    save({"summary": summary})


if __name__ == "__main__":
    main()
