"""Reliability (issue 18): --force and foreign files, one run per output, Ctrl-C, stale temporaries,
damaged checkpoints, and inputs that were accepted silently.

Every run here is tiny (resnet8 on digits, one epoch at most) or stopped at its first line.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from tests.fake_data import folder_bytes, one_line
from pathlib import Path

import pytest
import torch
import yaml

from compressor.checkpoint import ModelMeta, load_model, save_model
from compressor.errors import UserError
from compressor.models import create
from recipes.compress import compress
from tests.conftest import ROOT


class _Interrupt(Exception):
    pass


def _plan_file(tmp_path: Path, *stages: dict, name: str = "plan.yaml") -> str:
    """A hand-written plan of vanilla resnet8 stages on digits (no teacher, nothing to plan)."""
    rows = []
    for i, train in enumerate(stages or ({},), 1):
        rows.append({"name": f"s{i}", "scheme": "vanilla", "arch": "resnet8",
                     "train": {"epochs": 1, "stop_when_not_learning": False, "progress": "off", **train}})
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"data": "digits", "stages": rows}))
    return str(path)


def _old_run(folder: Path) -> dict[str, bytes]:
    """A finished run's files as our code writes them; returns {relative path: bytes}."""
    files = {"plan.yaml": b"data: digits\nstages: []\n", "report.json": b"{}", "report.md": b"# old\n",
             "student.pt": b"old weights", "student.onnx": b"old onnx", "plots/training_curves.png": b"png",
             "stages/old/model.pt": b"old stage", "stages/old/log.jsonl": b"{}\n"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files




# --- A: --force removes only our files, and only once the new run finished a stage ------------------
def test_force_refuses_a_folder_with_foreign_files_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    (out / "README.md").write_text("my notes")
    (out / "stages" / "old" / "data.csv").write_text("1,2")
    before = folder_bytes(out)
    plan = _plan_file(tmp_path)
    for force in (True, False):
        with pytest.raises(UserError, match="README.md|data.csv") as err:
            compress(preset=plan, data="digits", out=out, force=force, echo=lambda _: None)
        assert "not part of a kdcompress run" in str(err.value) or not force
    assert folder_bytes(out) == before


def test_a_run_knows_its_own_files():
    import tempfile

    from recipes.run_folder import foreign_files

    ours = ["plan.yaml", "run.json", "report.json", "report.md", "student.pt", "student.onnx", "student.int8.onnx",
            ".kdcompress.lock", ".student.pt.1.abcdefgh.tmp", ".previous-run/anything", "plots/candidates.png",
            "stages/ta1/model.pt", "stages/ta1/state.pt", "stages/ta1/log.jsonl", "stages/s/state.init.pt",
            "stages/s/log.init.jsonl", "stages/s/.state.pt.7.abcdefgh.tmp"]
    theirs = ["README.md", "data/x.npy", "plots/raw.csv", "stages/notes.txt", "stages/s/data.csv",
              ".hidden", "student.pt.bak"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel in ours + theirs:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")
        found = sorted(str(p.relative_to(root)) for p in foreign_files(root))
    assert found == sorted(["README.md", "data", "plots/raw.csv", "stages/notes.txt", "stages/s/data.csv",
                            ".hidden", "student.pt.bak"])


def test_out_at_a_folder_without_a_run_is_refused_unless_empty(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "images.npy").write_bytes(b"data")
    with pytest.raises(UserError, match="images.npy"):
        compress(preset=_plan_file(tmp_path), data="digits", out=out, echo=lambda _: None)
    assert folder_bytes(out) == {"images.npy": b"data"}
    # an empty folder is fine: the run starts (stopped here at its first stage line)
    empty = tmp_path / "empty"
    empty.mkdir()

    def stop(line: str) -> None:
        if line.startswith("stage 1 of 1"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        compress(preset=_plan_file(tmp_path), data="digits", out=empty, echo=stop)
    assert (empty / "plan.yaml").is_file()


def test_force_keeps_the_old_run_until_the_new_one_finished_its_first_stage(tmp_path):
    out = tmp_path / "run"
    old = _old_run(out)

    def interrupt(line: str) -> None:
        if line.startswith("stage 1 of 1"):
            raise KeyboardInterrupt

    # Ctrl-C in the first stage: the new run stays (to be resumed), the old one is kept aside, intact
    with pytest.raises(KeyboardInterrupt):
        compress(preset=_plan_file(tmp_path), data="digits", out=out, force=True, echo=interrupt)
    assert folder_bytes(out / ".previous-run") == old
    assert yaml.safe_load((out / "plan.yaml").read_text())["stages"][0]["name"] == "s1"
    with pytest.raises(UserError, match="previous-run"):
        compress(preset=_plan_file(tmp_path), data="digits", out=out, echo=lambda _: None)
    # a real failure inside the first stage (the loss is NaN at once): the old run is put back as it was
    with pytest.raises(UserError, match="diverged") as err:
        compress(preset=_plan_file(tmp_path, {"lr": 1e30}), data="digits", out=out, force=True, echo=lambda _: None)
    assert "no epoch had finished" in str(err.value) and "--resume" not in str(err.value)  # G: no state kept
    assert folder_bytes(out) == old


def test_force_replaces_the_old_run_once_the_first_stage_finished(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    (out / "stages" / "old" / ".state.pt.1.abcdefgh.tmp").write_bytes(b"half")  # a killed run's temporary
    plan = _plan_file(tmp_path, {}, {"lr": 1e30})  # stage 1 trains, stage 2 diverges
    with pytest.raises(UserError, match="diverged"):
        compress(preset=plan, data="digits", out=out, force=True, echo=lambda _: None)
    names = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert "stages/s1/model.pt" in names and "plan.yaml" in names
    assert not names & {"report.json", "report.md", "student.pt", "student.onnx", "stages/old", ".previous-run"}
    assert yaml.safe_load((out / "plan.yaml").read_text())["stages"][0]["name"] == "s1"


# --- B: one run per output folder ---------------------------------------------------------------
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the first process ended early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: timed out")
        time.sleep(0.2)


def test_a_second_run_into_the_same_out_is_refused_and_a_killed_run_does_not_block(cli, tmp_path):
    out = tmp_path / "run"
    plan = _plan_file(tmp_path, {"epochs": 200})  # a slow first stage: killed long before it ends
    first = subprocess.Popen([sys.executable, "-m", "recipes.cli", "--preset", plan, "--data", "digits",
                              "--out", str(out)], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "plan.yaml").is_file(), first, "the first run")
        for extra in ([], ["--force"]):
            result = cli("--preset", plan, "--data", "digits", "--out", str(out), *extra)
            assert result.exit_code == 2
            line = one_line(result.output)
            assert f"pid {first.pid}" in line and "recipes.cli" in line and str(out) in line
        resumed = cli("--resume", str(out))
        assert resumed.exit_code == 2 and f"pid {first.pid}" in resumed.output
    finally:
        first.kill()  # SIGKILL: no cleanup runs; the lock file stays behind
        first.wait()
    assert (out / ".kdcompress.lock").exists()

    def stop(line: str) -> None:
        if line.startswith("stage 1 of 1"):
            raise _Interrupt  # got past the lock: the killed run's lock was taken over

    with pytest.raises(_Interrupt):
        compress(out=out, resume=True, echo=stop)
    assert not (out / ".kdcompress.lock").exists()  # released (and removed) when the run ends


_HOLDER = """
import sys, time
from pathlib import Path
from compressor.lock import file_lock, hold
with hold(file_lock(Path(sys.argv[1])), sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_train_and_distill_refuse_an_output_another_process_writes(cli, tmp_path):
    target = tmp_path / "model.pt"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        train = cli("train", "--arch", "resnet8", "--data", "digits", "-o", str(target), "--epochs", "1", "-q")
        distill = cli("distill", "--student", "resnet8", "--cohort", "2", "--data", "digits", "-o", str(target),
                      "--epochs", "1", "-q")
        for result in (train, distill):
            assert result.exit_code == 2
            assert f"pid {holder.pid}" in one_line(result.output)
        assert not target.exists() and not Path(str(target) + ".jsonl").exists()
        assert not Path(str(target) + ".run").exists()
    finally:
        holder.kill()
        holder.wait()
    from compressor.lock import file_lock, hold

    with hold(file_lock(target), str(target)):  # the dead holder's lock is taken over
        assert json.loads(file_lock(target).read_text())["pid"] == os.getpid()
    assert not file_lock(target).exists()


# --- C: Ctrl-C names the --resume command -------------------------------------------------------
def _interrupting(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_names_the_resume_command(cli, tmp_path, monkeypatch):
    import recipes.compress
    import recipes.distill_run
    import recipes.training

    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.yaml").write_text("data: digits\n")
    monkeypatch.setattr(recipes.compress, "compress", _interrupting)
    monkeypatch.setattr(recipes.training, "train_vanilla", _interrupting)
    monkeypatch.setattr(recipes.distill_run, "distill", _interrupting)
    cases = [
        (["--teacher", "t.pt", "--budget", "1MFLOPs", "--out", str(out)], f"kdcompress --resume {out}"),
        (["--resume", str(out)], f"kdcompress --resume {out}"),
        (["train", "--arch", "resnet8", "-o", "m.pt", "--epochs", "3"],
         "kdcompress train --arch resnet8 -o m.pt --epochs 3 --resume"),
        (["distill", "--student", "resnet8", "--cohort", "2", "-o", "s.pt", "--resume"],
         "kdcompress distill --student resnet8 --cohort 2 -o s.pt --resume"),
    ]
    for args, command in cases:
        result = cli(*args)
        assert result.exit_code == 130, result.output
        line = one_line(result.output)
        assert "interrupted" in line and command in line and "Aborted" not in result.output
    # nothing was written in a folder that does not exist: there is nothing to resume
    result = cli("--teacher", "t.pt", "--budget", "1MFLOPs", "--out", str(tmp_path / "none"))
    assert result.exit_code == 130 and "--resume" not in one_line(result.output)


# --- D: stale temporaries of ours are removed, nothing else ---------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_atomic_write_removes_stale_temporaries_of_its_target_only(tmp_path):
    from compressor.atomic import write_text

    dead = _dead_pid()
    stale = [f".report.json.{dead}.k2j4h5g6.tmp", ".report.json.a1b2c3d4.tmp",  # with and without a pid
             f".report.json.{dead}.zzzzzzzz.tmp.simplified"]
    kept = [f".report.json.{os.getpid()}.q1w2e3r4.tmp",  # a live writer's (this process)
            ".other.json.a1b2c3d4.tmp", "report.json.tmp", ".report.json.notes", "notes.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    write_text(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["report.json"])


def test_the_next_run_into_a_folder_removes_its_stale_temporaries(tmp_path):
    out = tmp_path / "run"
    dead = _dead_pid()
    temps = [f"stages/s1/.state.pt.{dead}.abcdefgh.tmp", f".student.onnx.{dead}.abcdefgh.tmp",
             f".student.onnx.{dead}.abcdefgh.tmp.simplified", f"plots/.candidates.png.{dead}.abcdefgh.tmp"]
    for rel in temps:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x" * 100)

    def stop(line: str) -> None:
        if line.startswith("stage 1 of 1"):
            raise _Interrupt

    (out / "plan.yaml").write_text(Path(_plan_file(tmp_path)).read_text())  # a run killed while saving
    with pytest.raises(_Interrupt):
        compress(out=out, resume=True, echo=stop)
    assert not any((out / rel).exists() for rel in temps) and (out / "plan.yaml").is_file()


# --- E: damaged checkpoints are refused by every reader ------------------------------------------
def _digits_checkpoint(path: Path, fill: float | None = None) -> Path:
    model = create("resnet8", num_classes=10, in_chans=1)
    if fill is not None:
        with torch.no_grad():
            next(p for p in model.parameters() if p.dim() == 4).view(-1)[:5] = fill
    save_model(path, model, ModelMeta("resnet8", 10, 1, (8, 8), (0.5,), (0.25,), "digits"))
    return path


def _damage_weights(path: Path, nbytes: int = 4096) -> None:
    """Flip bytes inside the largest stored tensor without touching the zip's recorded CRC."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 4
        n = min(nbytes, info.file_size // 2)
        fh.seek(start)
        data = fh.read(n)
        fh.seek(start)
        fh.write(bytes(b ^ 0x5A for b in data))


def test_damaged_or_non_finite_checkpoints_are_refused_by_every_reader(cli, tmp_path):
    from compressor.trainer.state import load_state, save_state

    crc = _digits_checkpoint(tmp_path / "crc.pt")
    _damage_weights(crc)
    nan = _digits_checkpoint(tmp_path / "nan.pt", fill=float("nan"))
    inf = _digits_checkpoint(tmp_path / "inf.pt", fill=float("inf"))
    no_meta = tmp_path / "nometa.pt"
    good = torch.load(_digits_checkpoint(tmp_path / "good.pt"), weights_only=True)
    torch.save({k: v for k, v in good.items() if k != "meta"}, no_meta)
    bad_meta = tmp_path / "badmeta.pt"
    torch.save({**good, "meta": {"num_classes": 10}}, bad_meta)
    cases = [(crc, "CRC"), (nan, "not finite"), (inf, "not finite"), (no_meta, "meta"), (bad_meta, "meta")]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            load_model(path)
        for args in (["eval", str(path)], ["export", str(path), "-o", str(tmp_path / "x.onnx")],
                     ["bench", str(path), "--runs", "1", "--warmup", "0", "--min-time", "0"]):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert message in one_line(result.output)
    assert not (tmp_path / "x.onnx").exists()
    state = tmp_path / "state.pt"
    save_state(state, {"epoch": 1, "scheme": {"w": torch.randn(4096)}})
    _damage_weights(state)
    with pytest.raises(UserError, match="CRC"):
        load_state(state)


# --- F: accepted silently before, one line now ---------------------------------------------------
def test_silently_accepted_inputs_are_refused(cli, tmp_path):
    teacher = str(_digits_checkpoint(tmp_path / "teacher.pt"))
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["train", "--arch", "resnet8", "-o", str(out / "m.pt"), "--batch-size", "100000"], "batch size 100000"),
        (["distill", "--teacher", teacher, "--student", "resnet8", "-o", str(out / "s.pt"), "--batch-size", "5000"],
         "batch size 5000"),
        (["distill", "--teacher", teacher, "--student", "resnet8", "-o", str(out / "s.pt"), "--method",
          "hinton:0,ce:0"], "every weight"),
        (["bench", str(out / "missing.onnx"), "--threads", "0"], "thread count"),
        (["bench", str(out / "missing.onnx"), "--threads", "1,0"], "thread count"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line(result.output)
    assert list(out.iterdir()) == []


def test_data_that_cannot_train_a_classifier_is_refused(tmp_path):
    from fake_data import write_cifar, write_imagefolder

    from compressor.data import load_source

    one_class = write_imagefolder(tmp_path / "one", classes=("cat",))
    with pytest.raises(UserError, match="at least 2 classes"):
        load_source(f"imagefolder:{one_class}")
    for labels in (["cat", "dog"], ["3", "4"]):
        root = write_cifar(tmp_path / f"c{labels[0]}", kind="cifar10", per_class_train=1)
        batch_path = root / "cifar-10-batches-py" / "data_batch_1"
        from compressor.data.cifar import read_batch
        from fake_data import py2_pickle

        batch = read_batch(batch_path)
        batch["labels"] = [labels[i % 2] for i in range(len(batch["labels"]))]
        batch_path.write_bytes(py2_pickle(batch))
        with pytest.raises(UserError, match="labels must be integers"):
            load_source(f"cifar10:{root}")


# --- G: a learning rate that is not a finite positive number is refused before anything is written --
def test_non_finite_learning_rate_is_refused_at_the_edge(cli, tmp_path):
    teacher = str(_digits_checkpoint(tmp_path / "teacher.pt"))
    out = tmp_path / "out"
    out.mkdir()
    for lr in ("inf", "nan", "-1", "0"):
        for args in (["train", "--arch", "resnet8", "-o", str(out / "m.pt"), "--lr", lr, "--epochs", "1"],
                     ["distill", "--teacher", teacher, "--student", "resnet8", "-o", str(out / "s.pt"),
                      "--lr", lr, "--epochs", "1"]):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert "--lr" in one_line(result.output)
    assert list(out.iterdir()) == []
    from recipes.plan import Plan

    for lr in (float("inf"), float("nan")):
        with pytest.raises(UserError, match="learning rate"):
            Plan.from_dict(yaml.safe_load(Path(_plan_file(tmp_path, {"lr": lr})).read_text()))
    raw = yaml.safe_load(Path(_plan_file(tmp_path)).read_text())
    raw["stages"][0]["method"] = "hinton:0,ce:0"
    with pytest.raises(UserError, match="every weight"):
        Plan.from_dict(raw)


def test_divergence_offers_resume_only_when_a_state_was_kept():
    from compressor.trainer.loop import TrainingDiverged, _guard

    losses = {"ce": torch.tensor(float("nan"))}
    for history, offered in (([], False), ([{"epoch": 1}], True)):
        with pytest.raises(TrainingDiverged) as err:
            _guard(0, _NoDist(), 1, 0, 10, losses, "state.pt", history)
        assert ("--resume" in str(err.value)) == offered


class _NoDist:
    enabled = False
