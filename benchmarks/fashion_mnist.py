"""Fashion-MNIST: does distillation give a better student than the same student trained alone?

One command, the real CLI for every run (``python -m recipes.cli ...``, one thread each, two at a
time on two cores), JSON + a table:

* **data**: the real Fashion-MNIST files (Debian's ``dataset-fashion-mnist``, or ``--source DIR``),
  with a CPU-sized training set: a stratified ``--train-size`` subset of the 60,000 training images
  (fixed seed 0, the same for every run) written as IDX files to ``WORKDIR/data`` beside the full
  10,000-image t10k test set, read back through ``fashion-mnist:WORKDIR/data``. Every run holds
  out its seeded 10% validation split from that subset and is scored once on the full test set.
* **teacher**: ``kdcompress train --arch resnet20`` for ``--teacher-epochs``, trained once, reused
  by every run; its test accuracy and training time are reported. A second teacher trains on the
  noisy labels for the noise rows.
* **students at about 1 MFLOPs** (the main command's choice at ``--budget 1MFLOPs``, read from
  ``kdcompress plan``): vanilla (``train``), and ``distill --method`` hinton, dkd, crd, hinton+crd,
  each for ``--epochs`` at seeds ``--seeds``; the main command itself (``--baseline``: its vanilla
  twin, same arch, epochs and seed) at 1 and 5 MFLOPs.
* **label noise** sigma = 0.4 (Sarfraz et al. 2021: teacher and student on the same noisy labels):
  vanilla vs hinton from the noisy teacher.
* **OSAKD** (Tzelepi & Tefas 2021): its Fashion-MNIST CNN with OSAKD vs the same CNN trained
  plainly, batch 64, momentum 0.9, ``--osakd-epochs`` (the paper's 100 on a GPU), lr ``--osakd-lr``.

The table gives the test top-1 as mean (sd) over the seeds and the KD gain over the vanilla row.
``--resume`` keeps the runs already in ``--out``, so more label-noise rows can be added to the
same table (the README's: ``--resume --skip methods main osakd --noise-epochs 30 --noise-student
resnet_d8_w0.71 [--noise-teacher-epochs 30]``). For the full protocol on a GPU::

    python benchmarks/fashion_mnist.py --train-size 60000 --teacher-epochs 60 --epochs 60 \\
        --osakd-epochs 100 --workers 1

    PYTHONPATH=$PWD python benchmarks/fashion_mnist.py --out benchmarks/results/fashion_mnist.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.checkpoint import load_model  # noqa: E402
from compressor.data.idx import FASHION_MNIST, FILES, IMAGES_MAGIC, LABELS_MAGIC, debian_dir, encode_idx, find_files, read_idx  # noqa: E402
from compressor.data.splits import stratified_subset  # noqa: E402

METHODS = ("hinton", "dkd", "crd", "hinton+crd")
NOISE = 0.4


@dataclass
class Job:
    name: str
    argv: list[str]
    read: Callable[[], dict[str, Any]]
    after: tuple[str, ...] = ()
    weight: float = 1.0  # rough cost, to start the long jobs first
    meta: dict[str, Any] = field(default_factory=dict)


def write_subset(source: Path, out: Path, train_size: int) -> Path:
    """A stratified ``train_size`` subset of the training files plus the whole test set, as IDX .gz."""
    files = find_files(source, FASHION_MNIST)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        image_name, label_name = FILES[split]
        images, labels = read_idx(files[image_name], IMAGES_MAGIC), read_idx(files[label_name], LABELS_MAGIC)
        if split == "train" and train_size < labels.shape[0]:
            keep = stratified_subset(torch.from_numpy(labels.astype(np.int64)), train_size).numpy()
            images, labels = images[keep], labels[keep]
        for name, array in ((image_name, images), (label_name, labels)):
            (out / f"{name}.gz").write_bytes(gzip.compress(encode_idx(array), compresslevel=1))
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "recipes.cli", *args]


def checkpoint_top1(path: Path) -> Callable[[], dict[str, Any]]:
    def read() -> dict[str, Any]:
        metrics = load_model(path).metrics
        return {"test_top1": metrics.get("test_top1"), "val_top1": metrics.get("val_top1")}
    return read


def report_row(folder: Path) -> Callable[[], dict[str, Any]]:
    def read() -> dict[str, Any]:
        report = json.loads((folder / "report.json").read_text())
        base = report.get("baseline") or {}
        return {"test_top1": report["student"]["test_top1"], "baseline_top1": base.get("test_top1"),
                "kd_gain": base.get("kd_gain"), "arch": report["student"]["search_name"],
                "mflops": report["student"]["flops"] / 1e6, "recipe": report["recipe"],
                "stages": [f"{s['name']}:{s['arch']}" for s in report["stages"]],
                "method": report["plan"]["stages"][-1].get("method")}
    return read


def run_job(job: Job, log_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    log_path = log_dir / (job.name.replace("/", "-").replace(" ", "_") + ".log")
    with open(log_path, "w") as log:
        proc = subprocess.run(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:]
        return {"error": tail[0] if tail else f"exit {proc.returncode}", "seconds": seconds}
    return {**job.read(), "seconds": seconds}


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", default=["1MFLOPs", "5MFLOPs"])
    parser.add_argument("--noise-epochs", type=int, default=None, help="epochs of the label-noise rows (default: --epochs)")
    parser.add_argument("--noise-teacher-epochs", type=int, default=None,
                        help="epochs of the teacher trained on the noisy labels (default: --teacher-epochs)")
    parser.add_argument("--noise-student", default=None, help="student of the label-noise rows (default: the 1 MFLOPs one)")
    parser.add_argument("--osakd-epochs", type=int, default=10)
    parser.add_argument("--osakd-lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--skip", nargs="*", default=[], help="groups to leave out: methods main noise osakd")
    parser.add_argument("--workdir", default="benchmarks/results/fashion_mnist")
    parser.add_argument("--out", default="benchmarks/results/fashion_mnist.json")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    work = (ROOT / args.workdir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = ROOT / args.out
    state: dict[str, Any] = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    results: dict[str, Any] = state.get("runs", {})
    source = Path(args.source) if args.source else debian_dir()
    if source is None:
        sys.exit("no Fashion-MNIST files: apt-get install dataset-fashion-mnist, or give --source DIR")
    data_dir = work / "data"
    if not (data_dir / "t10k-labels-idx1-ubyte.gz").is_file():
        write_subset(source, data_dir, args.train_size)
    data = f"fashion-mnist:{data_dir}"
    epochs = str(args.epochs)
    noise_epochs = args.noise_epochs or args.epochs

    def save(extra: dict[str, Any] | None = None) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "runs": results, **(extra or {})}, indent=1))
        tmp.replace(out)

    def run_all(jobs: list[Job]) -> None:
        todo = [j for j in jobs if j.name not in results or "error" in results[j.name]]
        todo.sort(key=lambda j: -j.weight)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for job, result in zip(todo, pool.map(lambda j: run_job(j, logs), todo)):
                results[job.name] = {**job.meta, **result}
                shown = result.get("error") or f"test {result.get('test_top1', float('nan')):.2f}%"
                print(f"{job.name:<28} {shown}  ({result['seconds']:.0f} s)", flush=True)
                save()

    noisy_epochs = args.noise_teacher_epochs or args.teacher_epochs
    teacher_tag = "" if noisy_epochs == args.teacher_epochs else f"-e{noisy_epochs}"
    teacher, noisy_teacher = work / "teacher.pt", work / f"teacher-noisy{teacher_tag}.pt"
    base_train = ["--data", data, "-q"]
    run_all([
        Job("teacher", cli("train", "--arch", args.teacher, *base_train, "--epochs", str(args.teacher_epochs),
                           "-o", str(teacher)), checkpoint_top1(teacher), weight=10),
        Job(f"teacher-noisy{teacher_tag}", cli("train", "--arch", args.teacher, *base_train, "--epochs", str(noisy_epochs),
                                               "--label-noise", str(NOISE), "-o", str(noisy_teacher)),
            checkpoint_top1(noisy_teacher), weight=10),
    ])
    plan_file = work / "plan-1M.yaml"
    subprocess.run(cli("plan", "--teacher", str(teacher), "--budget", args.budgets[0], "--data", data,
                       "-o", str(plan_file)), cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    import yaml

    student = yaml.safe_load(plan_file.read_text())["stages"][-1]["arch"]
    state["student"] = student
    print(f"student at {args.budgets[0]}: {student}", flush=True)

    jobs: list[Job] = []
    for seed in args.seeds:
        s = str(seed)
        if "methods" not in args.skip:
            path = work / f"vanilla-s{s}.pt"
            jobs.append(Job(f"vanilla/s{s}", cli("train", "--arch", student, *base_train, "--epochs", epochs,
                                                  "--seed", s, "-o", str(path)), checkpoint_top1(path), weight=1,
                            meta={"row": "vanilla", "seed": seed}))
            for method in METHODS:
                path = work / f"{method}-s{s}.pt"
                jobs.append(Job(f"{method}/s{s}", cli("distill", "--teacher", str(teacher), "--student", student,
                                                       "--method", method, *base_train, "--epochs", epochs,
                                                       "--seed", s, "-o", str(path)),
                                checkpoint_top1(path), weight=3, meta={"row": method, "seed": seed}))
        if "main" not in args.skip:
            for budget in args.budgets:
                folder = work / f"main-{budget}-s{s}"
                jobs.append(Job(f"main {budget}/s{s}", cli("--teacher", str(teacher), "--budget", budget, "--data", data,
                                                            "--epochs", epochs, "--seed", s, "--baseline",
                                                            "--out", str(folder), "--force"),
                                report_row(folder), weight=6, meta={"row": f"main {budget}", "seed": seed}))
        if "noise" not in args.skip:
            e, arch = str(noise_epochs), args.noise_student or student
            tag = f"e{e}" + ("" if arch == student else f" {arch}")
            label = f"noise 0.4, {e} epochs" + ("" if arch == student else f", {arch}")
            path = work / f"noisy-vanilla-{tag.replace(' ', '-')}-s{s}.pt"
            jobs.append(Job(f"noisy vanilla {tag}/s{s}", cli("train", "--arch", arch, *base_train, "--epochs", e,
                                                              "--label-noise", str(NOISE), "--seed", s, "-o", str(path)),
                            checkpoint_top1(path), weight=1, meta={"row": f"{label}: vanilla", "seed": seed, "arch": arch}))
            path = work / f"noisy-hinton-{tag.replace(' ', '-')}{teacher_tag}-s{s}.pt"
            by = "" if not teacher_tag else f", teacher {noisy_epochs} epochs"
            jobs.append(Job(f"noisy hinton {tag}{teacher_tag}/s{s}",
                            cli("distill", "--teacher", str(noisy_teacher), "--student", arch, "--method", "hinton",
                                *base_train, "--epochs", e, "--label-noise", str(NOISE), "--seed", s, "-o", str(path)),
                            checkpoint_top1(path), weight=3, meta={"row": f"{label}{by}: hinton", "seed": seed, "arch": arch}))
        if "osakd" not in args.skip:
            common = ["--data", data, "-q", "--epochs", str(args.osakd_epochs), "--batch-size", "64",
                      "--lr", str(args.osakd_lr), "--seed", s]
            path = work / f"osakd-plain-s{s}.pt"
            jobs.append(Job(f"osakd plain/s{s}", cli("train", "--arch", "osakd_fmnist_cnn", *common, "-o", str(path)),
                            checkpoint_top1(path), weight=0.5, meta={"row": "osakd cnn: plain", "seed": seed}))
            path = work / f"osakd-s{s}.pt"
            jobs.append(Job(f"osakd/s{s}", cli("distill", "--scheme", "osakd", "--student", "osakd_fmnist_cnn", *common,
                                               "-o", str(path)),
                            checkpoint_top1(path), weight=0.6, meta={"row": "osakd cnn: osakd", "seed": seed}))
    run_all(jobs)
    summary = summarise(results, state, args)
    save({"student": student, "summary": summary})


def summarise(results: dict[str, Any], state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, record in results.items():
        if "row" in record:
            rows.setdefault(record["row"], []).append(record)
    teacher = results.get("teacher", {})
    noisy = results.get("teacher-noisy", {})
    print(f"\nFashion-MNIST, {args.train_size} training images (stratified subset; 10% val held out), full "
          f"10,000-image test set; teacher {args.teacher} ({args.teacher_epochs} epochs, "
          f"{teacher.get('test_top1', float('nan')):.2f}% test, {teacher.get('seconds', 0) / 60:.1f} min); "
          f"noisy teacher {noisy.get('test_top1', float('nan')):.2f}%; students {args.epochs} epochs, seeds {args.seeds}")
    print("| row | student | n | test top-1 mean (sd) | KD gain (points) |")
    print("|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    noise_rows = sorted({r for r in rows if r.startswith("noise")},
                        key=lambda r: (int(r.split(", ")[1].split()[0]), r.rsplit(": ", 1)[0], r.endswith(": hinton")))
    reference_of = {**{m: "vanilla" for m in METHODS}, "osakd cnn: osakd": "osakd cnn: plain",
                    **{r: re.sub(r", teacher \d+ epochs", "", r).replace(": hinton", ": vanilla")
                       for r in noise_rows if r.endswith(": hinton")}}

    def mean_of(row: str) -> float | None:
        accs = [r["test_top1"] for r in rows.get(row, []) if r.get("test_top1") is not None]
        return statistics.mean(accs) if accs else None

    order = ["vanilla", *METHODS, *(f"main {b}" for b in args.budgets), *noise_rows,
             "osakd cnn: plain", "osakd cnn: osakd"]
    for row in order:
        records = rows.get(row, [])
        accs = [r["test_top1"] for r in records if r.get("test_top1") is not None]
        errors = [r["error"] for r in records if "error" in r]
        if not accs:
            if errors:
                print(f"| {row} | - | 0 | failed: {errors[0]} | - |")
            continue
        mean, sd = stats(accs)
        if row.startswith("main"):
            base = [r["baseline_top1"] for r in records if r.get("baseline_top1") is not None]
            gains = [r["kd_gain"] for r in records if r.get("kd_gain") is not None]
            arch = f"{records[0]['arch']} ({records[0]['mflops']:.2f} MFLOPs, {records[0]['recipe']}, {records[0]['method']})"
            gain_mean, gain_sd = stats(gains) if gains else (float("nan"), 0.0)
            gain = f"{gain_mean:+.2f} ({gain_sd:.2f}) vs its twin {statistics.mean(base):.2f}"
        else:
            reference = reference_of.get(row)
            ref = mean_of(reference) if reference else None
            arch = records[0].get("arch") or (state.get("student", "") if not row.startswith("osakd") else "osakd_fmnist_cnn")
            gain = f"{mean - ref:+.2f}" if ref is not None else "-"
        summary[row] = {"mean": mean, "sd": sd, "n": len(accs), "errors": errors}
        note = f" ({len(errors)} failed)" if errors else ""
        print(f"| {row} | {arch} | {len(accs)} | {mean:.2f} ({sd:.2f}){note} | {gain} |")
    return summary


if __name__ == "__main__":
    main()
