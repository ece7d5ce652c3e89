"""Soak (issue 18, item 7): the digits main job, N times in a row, each killed with SIGKILL at
seeded random moments and resumed with ``kdcompress --resume DIR`` until it finishes; every
finished folder is compared with an uninterrupted reference run.

    PYTHONPATH=$PWD python benchmarks/soak.py [--runs 3] [--epochs 2] [--max-kills 4] [--seed 0]

The job is the README's main command on digits with everything on: ``--teacher resnet8.pt
--budget 0.1MFLOPs --int8 --baseline`` (a TA chain, the baseline twin, export, int8, latency, the
report), ``--epochs`` per stage. Each run starts the command, waits a delay drawn uniformly from
[0, the reference run's wall time) (``random.Random(seed)``), and SIGKILLs the process if it is
still running; then ``--resume run`` (with the command's arguments while the run has no plan yet)
with a new delay, until the run ends by itself or has been
killed ``--max-kills`` times (then it is resumed without a kill). Kills come from outside at any
instant, inside C code and writes included (``tests/test_kill_resume.py`` kills at chosen calls
inside each phase instead). The phase each kill landed in is read from the run's phase trace
(``tests/kill_points.py --trace``: the phase marks of :mod:`recipes.journal`, no profiler).

After every kill the folder must hold no incomplete file at a final name; at the end each run's
folder is compared with the reference's: ``student.pt``, every stage's model, the ONNX files, the
plan and the curves byte for byte; report, logs, training states and run.json by their figures,
timings aside (``tests.kill_points.differences``). Zero differences is the only acceptable count;
the exit status is 1 otherwise. Every process runs one thread (``OMP_NUM_THREADS=1``), as the
reference does. Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kill_points import differences, incomplete_files  # noqa: E402


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", KDCOMPRESS_CACHE=str(cache))


def _launch(cwd: Path, cache: Path, args: list[str], trace: Path) -> subprocess.Popen:
    """The command in its own process; its stderr goes to TRACE.err (a pipe left unread could fill)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(trace.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "tests.kill_points", "--trace", str(trace), "--", *args],
                                cwd=cwd, env=_env(cache), stdout=subprocess.DEVNULL, stderr=err)


def _stderr(trace: Path) -> str:
    return trace.with_suffix(".err").read_text()[-3000:]


def _last_phase(trace: Path) -> str:
    lines = trace.read_text().splitlines() if trace.exists() else []
    return lines[-1].split("\t", 1)[1] if lines else "start"


def _finish(proc: subprocess.Popen, trace: Path, what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{what} failed with status {proc.returncode}:\n{_stderr(trace)}")


def soak(args: argparse.Namespace, work: Path) -> dict:
    cache = work / "cache"
    teacher = work / "resnet8.pt"
    subprocess.run([sys.executable, "-m", "recipes.cli", "train", "--arch", "resnet8", "--data", "digits", "--epochs",
                    str(args.teacher_epochs), "-o", str(teacher), "--quiet"], cwd=work, env=_env(cache), check=True,
                   capture_output=True)
    job = ["--teacher", str(teacher), "--budget", args.budget, "--epochs", str(args.epochs), "--int8", "--baseline"]
    # the candidates' costs measured once, so that every run (the reference too) plans from a warm cache
    subprocess.run([sys.executable, "-m", "recipes.cli", "plan", "--teacher", str(teacher), "--budget", args.budget],
                   cwd=work, env=_env(cache), check=True, capture_output=True)

    started = time.monotonic()
    reference = _launch(work / "reference", cache, ["--out", "run", *job], work / "reference.trace")
    _finish(reference, work / "reference.trace", "the reference run")
    reference_s = time.monotonic() - started
    print(f"reference run: {reference_s:.1f} s", flush=True)

    rng = random.Random(args.seed)
    runs = []
    for number in range(1, args.runs + 1):
        folder = work / f"run{number}"
        kills: list[dict] = []
        attempts, run_started = 0, time.monotonic()
        while True:
            # a bare --resume once the run wrote its plan; before that (killed while planning) nothing was
            # recorded, and the command itself with --resume starts it
            command = ["--out", "run", *job] if attempts == 0 else \
                ["--resume", "run"] if (folder / "run" / "plan.yaml").is_file() else ["--resume", "run", *job]
            trace = folder / f"attempt{attempts}.trace"
            proc = _launch(folder, cache, command, trace)
            attempts += 1
            if len(kills) >= args.max_kills:
                _finish(proc, trace, f"run {number}, attempt {attempts}")
                break
            delay = rng.uniform(0.0, reference_s)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            if proc.returncode == -signal.SIGKILL:
                phase = _last_phase(trace)
                bad = incomplete_files(folder / "run") if (folder / "run").exists() else []
                kills.append({"after_s": round(delay, 2), "phase": phase, "incomplete_files": bad})
                print(f"run {number}: SIGKILL after {delay:.1f} s in {phase}" + (f"; INCOMPLETE: {bad}" if bad else ""),
                      flush=True)
                continue
            if proc.returncode != 0:
                raise SystemExit(f"run {number}, attempt {attempts} failed with status {proc.returncode}:\n"
                                 f"{_stderr(trace)}")
            break
        found = differences(work / "reference" / "run", folder / "run")
        runs.append({"run": number, "kills": kills, "resumes": attempts - 1,
                     "seconds": round(time.monotonic() - run_started, 1), "differences": found})
        print(f"run {number}: {len(kills)} kill(s), {attempts - 1} resume(s), {len(found)} difference(s)"
              + "".join(f"\n  {d}" for d in found), flush=True)

    every_kill = [k for r in runs for k in r["kills"]]
    every_difference = [d for r in runs for d in r["differences"]]
    return {
        "benchmark": "soak",
        "command": "PYTHONPATH=$PWD python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "job": "kdcompress " + " ".join(job).replace(str(teacher), "resnet8.pt") + " --out run",
        "settings": {"runs": args.runs, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "budget": args.budget, "max_kills": args.max_kills, "seed": args.seed, "threads": 1},
        "reference_seconds": round(reference_s, 1),
        "runs": len(runs),
        "kills": len(every_kill),
        "resumes": sum(r["resumes"] for r in runs),
        "kills_by_phase": dict(Counter(k["phase"] for k in every_kill)),
        "incomplete_files_after_kills": sum(len(k["incomplete_files"]) for k in every_kill),
        "differences": len(every_difference),
        "weight_differences": sum(": tensor" in d or d.endswith(".pt: bytes") for d in every_difference),
        "per_run": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="main jobs, one after the other")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage (2: a kill can land between epochs)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--budget", default="0.1MFLOPs")
    parser.add_argument("--max-kills", type=int, default=4, help="kills per run before it may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed at the end)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kdcompress-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = soak(args, work.resolve())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"runs {result['runs']}, kills {result['kills']}, resumes {result['resumes']}, incomplete files after a "
          f"kill {result['incomplete_files_after_kills']}, differences {result['differences']} "
          f"(weights {result['weight_differences']}); kills by phase {result['kills_by_phase']}; wrote {args.json}")
    return 1 if result["differences"] or result["incomplete_files_after_kills"] else 0


if __name__ == "__main__":
    sys.exit(main())
