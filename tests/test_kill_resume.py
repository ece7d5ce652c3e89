"""Kill -9 anywhere, resume exactly (issue 18, item 2).

The main command runs as a real process (``tests/kill_points.py``) and is SIGKILLed at a seeded
random call inside one phase; ``--resume`` then continues it. One lineage of runs kills it once in
every phase in turn (planning, each stage, the student file, the baseline, export, int8, the
latency probe, the report), each kill landing in a run that resumed from the kill before. After
every kill no file at a final name may be incomplete; at the end the folder must hold the files an
uninterrupted run holds: the same bytes (``student.pt``, every stage's model, the ONNX files, the
plan, the curves), and the same figures in the report, the logs and the training states, timings
aside. The two lineages take about 2 and 1 minutes on one CPU core (marked slow; they run in CI).

Before the fixes these failed: a bare ``--resume DIR`` forgot ``--int8`` and ``--baseline``,
reported the stages it loaded without their curves, and wrote a student.pt with other bytes (the
plan read back from plan.yaml pickles larger); a run killed while planning could not be resumed.

Runs are tiny (digits, 2 epochs, a 0.1 MFLOPs student) and every process uses one thread, so the
uninterrupted and the resumed runs do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.kill_points import differences, incomplete_files

CHAIN_PHASES = ["plan", "stage:ta1", "stage:student", "student", "stage:baseline", "export", "int8", "latency",
                "report"]
COHORT_PHASES = ["plan", "stage:student", "student", "export", "latency", "report"]


def _env(cache: Path) -> dict[str, str]:  # one thread: the reference and the resumed runs do the same arithmetic
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", KDCOMPRESS_CACHE=str(cache))


def _run(cwd: Path, cache: Path, args: list[str], *, phase: str | None = None, at: int = 1,
         count: Path | None = None) -> subprocess.CompletedProcess:
    points = (["--phase", phase, "--at", str(at)] if phase else []) + (["--count", str(count)] if count else [])
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "tests.kill_points", *points, "--", *args], cwd=cwd,
                          env=_env(cache), capture_output=True, text=True, timeout=900)


class _Stop(Exception):
    pass


def _stop_at(prefix: str):
    def echo(line: str) -> None:
        if line.startswith(prefix):
            raise _Stop(line)
    return echo


def test_a_bare_resume_delivers_what_the_first_command_asked_for_and_redoes_no_finished_phase(
        tmp_path, cache_dir, digits_teacher, monkeypatch):
    # Before: `--resume DIR` forgot --int8 and --baseline (no student.int8.onnx, no KD gain), reported
    # the stages it loaded with no training curves, and exported and timed the student again.
    import recipes.deploy
    from recipes.compress import compress
    from tests.kill_points import timeless

    out = tmp_path / "run"
    with pytest.raises(_Stop):  # stopped once the export is done and recorded, as it starts timing
        compress(digits_teacher, ["0.1MFLOPs"], out=out, epochs=1, int8=True, baseline=True, echo=_stop_at("timing"))
    assert (out / "student.int8.onnx").is_file() and not (out / "report.json").exists()

    def never(*args, **kwargs):
        raise AssertionError("a finished phase was done again")

    monkeypatch.setattr(recipes.deploy, "export_with_data", never)
    first = compress(out=out, resume=True, echo=lambda _: None).report.to_dict()
    assert first["baseline"]["kd_gain"] is not None and first["student"]["int8"]["int8_top1"] is not None
    for stage in first["stages"]:
        logged = [json.loads(line) for line in (out / "stages" / stage["name"] / "log.jsonl").read_text().splitlines()]
        assert stage["history"] == logged and len(logged) == 1
    monkeypatch.setattr(recipes.deploy, "latency_of", never)
    again = compress(out=out, resume=True, echo=lambda _: None).report.to_dict()
    assert again["student"]["latency"] == first["student"]["latency"]  # recorded once, not measured again
    assert timeless(again) == timeless(first)


def test_the_command_with_resume_starts_a_run_killed_while_planning(tmp_path, cache_dir, digits_teacher):
    # a run killed while planning has written nothing: before, `--resume DIR` refused it ("holds no run")
    from compressor.errors import UserError
    from recipes.compress import compress

    out = tmp_path / "never-started"
    with pytest.raises(UserError, match="no plan.yaml.*run its command again"):
        compress(out=out, resume=True, echo=lambda _: None)
    lines = []

    def echo(line: str) -> None:
        lines.append(line)
        _stop_at("stage 1 of")(line)

    with pytest.raises(_Stop):
        compress(digits_teacher, ["0.1MFLOPs"], out=out, epochs=1, resume=True, echo=echo)
    assert "holds no plan yet" in lines[0] and (out / "plan.yaml").is_file() and (out / "run.json").is_file()


def kill_in_every_phase(tmp_path: Path, cache: Path, args: list[str], phases: list[str], seed: int) -> dict:
    """An uninterrupted reference run, then one lineage of runs killed once in each phase and resumed.
    Returns the counts and the differences found. ``cache`` (the candidates' costs) is warm for both
    runs, so their planning makes the same calls."""
    reference = _run(tmp_path / "reference", cache, ["--out", "run", *args], count=tmp_path / "counts.json")
    assert reference.returncode == 0, reference.stderr[-3000:]
    calls = json.loads((tmp_path / "counts.json").read_text())
    rng = random.Random(seed)
    cut = tmp_path / "cut"
    kills, log = 0, []
    for number, phase in enumerate(phases):
        at = rng.randint(1, calls[phase])
        # the first run is the command itself; killed while planning it recorded nothing, so the
        # next one is the command with --resume; every later one is the bare --resume DIR
        command = ["--out", "run", *args] if number == 0 else \
            ["--resume", "run", *args] if number == 1 else ["--resume", "run"]
        proc = _run(cut, cache, command, phase=phase, at=at)
        landed = [line for line in proc.stderr.splitlines() if line.startswith("kill_points:")]
        assert proc.returncode == -signal.SIGKILL and landed, \
            f"seed {seed}: the run meant to be killed in {phase} at call {at} ended with {proc.returncode}: " \
            f"{proc.stderr[-3000:]}"
        assert landed[-1].startswith(f"kill_points: SIGKILL in {phase} "), landed
        kills += 1
        log.append(landed[-1])
        bad = incomplete_files(cut / "run") if (cut / "run").exists() else []
        assert not bad, f"seed {seed}, after {landed[-1]}: {bad}"
    final = _run(cut, cache, ["--resume", "run"])
    assert final.returncode == 0, final.stderr[-3000:]
    return {"kills": kills, "resumes": kills, "points": log,
            "differences": differences(tmp_path / "reference" / "run", cut / "run")}


@pytest.mark.slow
def test_a_chain_killed_in_every_phase_resumes_to_the_uninterrupted_result(tmp_path, cache_dir, digits_teacher):
    from recipes.api import plan_compression

    plan_compression(teacher=digits_teacher, budgets=["0.1MFLOPs"])  # the costs cache, warm for both runs
    args = ["--teacher", digits_teacher, "--budget", "0.1MFLOPs", "--epochs", "2", "--int8", "--baseline"]
    outcome = kill_in_every_phase(tmp_path, cache_dir, args, CHAIN_PHASES, seed=18)
    print("\n".join(outcome["points"]))  # where the kills landed: pytest -rP shows it
    assert outcome["kills"] == len(CHAIN_PHASES)
    assert outcome["differences"] == [], "\n".join(outcome["points"] + outcome["differences"])
    report = json.loads((tmp_path / "cut" / "run" / "report.json").read_text())
    assert report["recipe"] == "takd" and report["baseline"] and report["student"]["int8"]


@pytest.mark.slow
def test_a_cohort_killed_in_every_phase_resumes_to_the_uninterrupted_result(tmp_path, cache_dir):
    from recipes.api import plan_compression

    plan_compression(teacher=None, budgets=["0.1MFLOPs"])
    args = ["--budget", "0.1MFLOPs", "--epochs", "2"]
    outcome = kill_in_every_phase(tmp_path, cache_dir, args, COHORT_PHASES, seed=6)
    print("\n".join(outcome["points"]))
    assert outcome["differences"] == [], "\n".join(outcome["points"] + outcome["differences"])
    report = json.loads((tmp_path / "cut" / "run" / "report.json").read_text())
    assert report["stages"][0]["scheme"] == "cohort"
