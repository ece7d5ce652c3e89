"""Where a short command spends its time: a 1-epoch digits distillation (resnet8 -> resnet8, the
case issue 17 measured at about 40 s of CPU) split into interpreter and torch import, the project's
own imports, the work before the first training step, the training steps, evaluation, and the rest;
and `kdcompress --help`.

    PYTHONPATH=$PWD python benchmarks/startup.py [--runs 3] [--epochs 1]

Each run is a fresh process (as a user's command is). The child times itself with the process's
CPU clock and the wall clock at: start, after `import torch`, after importing the CLI, around every
training epoch's steps (``_Run.train_epoch``) and every evaluation (``evaluate_many``, which covers
validation, the test score and the teacher's score), and at exit. The teacher (resnet8, 2 epochs on
digits) is trained once first. Writes benchmarks/results/startup.json; say the machine's load when
quoting (it is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
marks = {"start": (time.process_time(), time.perf_counter())}
import torch
marks["torch"] = (time.process_time(), time.perf_counter())
from recipes.cli import cli
marks["cli"] = (time.process_time(), time.perf_counter())
import compressor.trainer.loop as loop
ev = sys.modules["compressor.trainer.evaluate"]
spent = {"train": [0.0, 0.0], "eval": [0.0, 0.0], "eval_before_first_step": 0.0, "first_step_at": None}

def timed(name, fn):
    def wrapper(*a, **k):
        c, w = time.process_time(), time.perf_counter()
        if name == "train" and spent["first_step_at"] is None:
            spent["first_step_at"] = (c, w)
        try:
            return fn(*a, **k)
        finally:
            spent[name][0] += time.process_time() - c
            spent[name][1] += time.perf_counter() - w
            if name == "eval" and spent["first_step_at"] is None:
                spent["eval_before_first_step"] += time.process_time() - c
    return wrapper

loop._Run.train_epoch = timed("train", loop._Run.train_epoch)
original, wrapped = ev.evaluate_many, timed("eval", ev.evaluate_many)
for module in list(sys.modules.values()):  # every module that imported the name, ev itself among them
    if getattr(module, "evaluate_many", None) is original:
        module.evaluate_many = wrapped
try:
    cli.main(sys.argv[2:], prog_name="kdcompress", standalone_mode=False)
finally:
    marks["end"] = (time.process_time(), time.perf_counter())
    with open(sys.argv[1], "w") as f:
        json.dump({"marks": marks, "spent": spent}, f)
"""


def run_child(args: list[str], out: Path, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", CHILD, str(out), *args], cwd=cwd, env=env, check=True,
                   capture_output=True)
    return json.loads(out.read_text())


def help_cpu(cwd: Path) -> float:
    """CPU seconds of a whole `kdcompress --help` process, interpreter start included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "recipes.cli", "--help"], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def split(record: dict) -> dict[str, float]:
    """CPU seconds per phase (the interpreter's own start before the child's first line is not seen)."""
    m, spent = record["marks"], record["spent"]
    cpu = {k: v[0] for k, v in m.items()}
    first = spent["first_step_at"][0] if spent["first_step_at"] else cpu["end"]
    train, evaluation, early = spent["train"][0], spent["eval"][0], spent["eval_before_first_step"]
    return {
        "import_torch": cpu["torch"] - cpu["start"],
        "import_cli": cpu["cli"] - cpu["torch"],
        "before_first_step": first - cpu["cli"] - early,  # loading, building, planning (not evaluating)
        "train_steps": train,
        "evaluation": evaluation,  # the teacher's score, validation, the test score
        "rest": cpu["end"] - first - train - (evaluation - early),  # writing the student and the run folder
        "total": cpu["end"] - cpu["start"],
        "total_wall": m["end"][1] - m["start"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "recipes.cli", "train", "--arch", "resnet8", "--data", "digits",
                        "--epochs", "2", "-o", "teacher.pt"], cwd=work, env=env, check=True, capture_output=True)
        print("teacher trained; timing", flush=True)
        runs, helps = [], []
        for i in range(args.runs):
            record = run_child(["distill", "--teacher", "teacher.pt", "--student", "resnet8", "--epochs",
                                str(args.epochs), "-o", f"s{i}.pt"], work / f"r{i}.json", work)
            runs.append(split(record))
            helps.append(help_cpu(work))
    keys = list(runs[0])
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    total = median["total"]
    print(f"\n1-epoch digits distillation (resnet8 -> resnet8), median of {args.runs} runs, CPU seconds:")
    for k in keys:
        share = f"{100 * median[k] / total:5.1f}%" if k != "total_wall" else ""
        print(f"  {k:<18} {median[k]:7.3f}  {share}")
    after = total - median["import_torch"]
    print(f"  training steps: {100 * median['train_steps'] / total:.0f}% of the command, "
          f"{100 * median['train_steps'] / after:.0f}% of what follows `import torch`")
    print(f"kdcompress --help: {statistics.median(helps):.3f} s CPU (median, the whole process)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "load_before": os.getloadavg()[0], "runs": runs,
                               "median": median, "help_cpu_s": helps}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
