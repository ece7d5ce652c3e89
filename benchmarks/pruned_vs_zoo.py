"""Issue 14: the pruned-and-distilled teacher against the best zoo student distilled with the same epochs.

For each dataset (digits, and Fashion-MNIST as a stratified ``--train-size`` subset written by
``benchmarks/fashion_mnist.write_subset``) a resnet20 teacher is trained once (``train_vanilla``,
``--teacher-epochs``, seed 0). Then for each budget (a factor of the teacher's FLOPs, ``--budgets``)
and each seed, the main flow runs twice through the Python API, identical but for
``--candidates``:

* ``pruned``: the teacher pruned to the budget (Torch-Pruning, l1, layer scope, multiples of 8),
  then one offline distillation from the unpruned teacher starting from its kept weights;
* ``zoo``: the rule's zoo student (grid plus widths solved for the budget), distilled the same way
  (the recipe engine's method, ``--epochs``, the seed).

Each row is read from the run's ``report.json``: test top-1 of the student chosen on the
validation split, measured FLOPs and params, onnxruntime p50 latency at batch 1 (one thread), and
for the pruned rows the validation top-1 before recovery. The table gives mean (sd) over seeds.
``--resume`` keeps the runs already in ``--out``.

    PYTHONPATH=$PWD python benchmarks/pruned_vs_zoo.py --epochs 10 --seeds 0 1 2 \\
        --out benchmarks/results/pruned_vs_zoo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

DATASETS = ("digits", "fashion-mnist")


def teacher_for(data: str, workdir: Path, epochs: int, train_size: int, fashion_dir: str | None) -> tuple[str, str]:
    """(teacher path, data spec): trained once and reused."""
    from recipes.training import train_vanilla

    spec = data
    if data == "fashion-mnist":
        from benchmarks.fashion_mnist import write_subset
        from compressor.data.idx import DEBIAN_DIR

        folder = workdir / "fashion-data"
        if not folder.exists():
            write_subset(Path(fashion_dir) if fashion_dir else DEBIAN_DIR, folder, train_size)
        spec = f"fashion-mnist:{folder}"
    path = workdir / f"teacher-{data}.pt"
    if not path.exists():
        train_vanilla("resnet20", spec, path, epochs=epochs, seed=0, progress="off")
    return str(path), spec


def run_one(teacher: str, spec: str, budget: str, candidates: str, epochs: int, seed: int, out: Path) -> dict[str, Any]:
    from recipes.compress import compress

    started = time.perf_counter()
    result = compress(teacher, [budget], data=spec, out=out, epochs=epochs, seed=seed, candidates=candidates,
                      force=True, echo=lambda _: None)
    s, t = result.report.student, result.report.teacher
    return {
        "student": s.search_name, "test_top1": s.test_top1, "flops": s.flops,
        "params": s.params, "onnx_ms": s.latency_ms("onnx_ms"),
        "teacher_onnx_ms": t.latency_ms("onnx_ms") if t else None,
        "teacher_top1": t.test_top1 if t else None,
        "val_top1_before_recovery": s.pruning.val_top1_before_recovery if s.pruning else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mean_sd(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ({sd:.{digits}f})"


def table(results: dict[str, Any]) -> str:
    lines = ["| data | budget | candidates | student | test top-1 % | MFLOPs | params (K) | ORT ms (b=1) | "
             "val top-1 before recovery |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for key, row in results.items():
        data, budget, candidates, _seed = key.split("|")
        groups.setdefault((data, budget, candidates), []).append(row)
    for (data, budget, candidates), rows in sorted(groups.items()):
        first = rows[0]
        lines.append(f"| {data} | {budget} | {candidates} | {first['student']} | "
                     f"{_mean_sd([r['test_top1'] for r in rows])} | {first['flops'] / 1e6:.3f} | "
                     f"{first['params'] / 1e3:.1f} | {_mean_sd([r['onnx_ms'] for r in rows], 3)} | "
                     f"{_mean_sd([r['val_top1_before_recovery'] for r in rows])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--budgets", nargs="+", default=["2x", "4x"], help="factors of the teacher's FLOPs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=10000, help="Fashion-MNIST training images kept")
    parser.add_argument("--fashion-dir", default=None)
    parser.add_argument("--workdir", default="/tmp/kdcompress-pruned-vs-zoo")
    parser.add_argument("--out", default="benchmarks/results/pruned_vs_zoo.json")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(out.read_text())["runs"] if args.resume and out.exists() else {}
    for data in args.data:
        teacher, spec = teacher_for(data, workdir, args.teacher_epochs, args.train_size, args.fashion_dir)
        for budget in args.budgets:
            for seed in args.seeds:
                for candidates in ("pruned", "zoo"):
                    key = f"{data}|{budget}|{candidates}|{seed}"
                    if key in results:
                        continue
                    folder = workdir / "runs" / key.replace("|", "_")
                    results[key] = run_one(teacher, spec, budget, candidates, args.epochs, seed, folder)
                    print(key, json.dumps(results[key]), flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
