"""The thread policy (compressor/threads.py): its choice for given machines and op sizes, what it reads
from cgroups and /proc, and ``--threads`` honoured by train, distill and the main command's option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compressor import threads as tp
from compressor.threads import QUIET_MACS_PER_THREAD, SHARED_MACS_PER_THREAD, OpWork, choose_threads

ROOT = Path(__file__).resolve().parents[1]
DIGITS_OP = OpWork(16 * 8 * 8 * 16 * 9 * 32, "conv 16x8x8 at batch 32")  # 4.7M: resnet on digits
CIFAR_OP = OpWork(16 * 32 * 32 * 16 * 9 * 64, "conv 16x32x32 at batch 64")  # 151M: resnet20 at 32x32


TINY_OP = OpWork(300_000, "conv 8x4x4 at batch 8")


def test_small_ops_use_both_cores_of_an_idle_machine_and_one_of_a_shared_one():
    assert choose_threads(2, 2, None, None, DIGITS_OP).threads == 2  # 4.7M: idle, a second thread helps
    shared = choose_threads(2, 4, None, None, DIGITS_OP, busy=1)
    assert shared.threads == 1
    assert shared.line().startswith("threads: 1 (2 usable cores; per-op work small on shared cores: largest op "
                                    "4.72M multiply-adds (conv 16x8x8 at batch 32), one thread per 16.8M")
    # 16 CPUs, 4 busy elsewhere: 12 free cores, but a 4.7M op stays on one thread once others run
    assert choose_threads(16, 16, None, None, DIGITS_OP, busy=4).threads == 1


def test_a_tiny_op_gets_one_thread_even_on_an_idle_machine_and_the_line_says_why():
    choice = choose_threads(2, 2, None, None, TINY_OP)
    assert choice.threads == 1
    assert choice.line() == ("threads: 1 (2 usable cores; per-op work small: largest op 300K multiply-adds "
                             "(conv 8x4x4 at batch 8), one thread per 524K)")


def test_large_ops_use_every_usable_core_when_quiet():
    assert choose_threads(2, 2, None, None, CIFAR_OP).threads == 2
    assert choose_threads(2, 2, None, None, None).threads == 2  # work unknown: cores decide


def test_a_competitor_takes_its_core():
    one = choose_threads(2, 2, None, None, CIFAR_OP, busy=1)
    assert one.threads == 1 and "1 other runnable task on them" in one.line()
    assert choose_threads(2, 2, None, None, CIFAR_OP, busy=5).threads == 1  # never below one


def test_other_tasks_fill_the_cores_we_cannot_use_first():
    # 16 CPUs, affinity 4: 12 busy tasks can all sit on the other 12, 14 leave 2 of ours
    assert choose_threads(16, 4, None, None, CIFAR_OP, busy=12).threads == 4
    assert choose_threads(16, 4, None, None, CIFAR_OP, busy=14).threads == 2


@pytest.mark.parametrize("cores, affinity, quota, env, expected", [
    (16, 4, None, None, 4),          # affinity mask
    (16, 16, 2.5, None, 2),          # cgroup quota, rounded down
    (16, 16, 0.5, None, 1),          # a quota under one core still runs one thread
    (16, 16, None, "3", 3),          # OMP_NUM_THREADS
    (16, 16, None, "6,2", 6),        # nested OpenMP levels: the first
    (16, 16, None, "lots", 16),      # invalid env is ignored (as OpenMP does): the cores decide
    (16, 8, 6.0, "5", 5),            # the smallest limit wins
])
def test_usable_cores_are_the_smallest_limit(cores, affinity, quota, env, expected):
    assert choose_threads(cores, affinity, quota, env, CIFAR_OP).threads == expected


def test_op_size_caps_threads_on_a_big_machine():
    # quiet: one thread per 0.5M multiply-adds; shared: one per 16.8M
    assert DIGITS_OP.macs // QUIET_MACS_PER_THREAD == 9 and CIFAR_OP.macs // SHARED_MACS_PER_THREAD == 9
    assert choose_threads(64, 64, None, None, DIGITS_OP).threads == 9
    assert choose_threads(64, 64, None, None, CIFAR_OP).threads == 64
    assert choose_threads(64, 64, None, None, CIFAR_OP, busy=8).threads == 9


def test_the_process_setting_is_a_ceiling_and_a_request_beats_everything():
    assert choose_threads(16, 16, None, None, CIFAR_OP, ceiling=1).threads == 1  # the test suite's 1 thread
    forced = choose_threads(2, 2, None, None, DIGITS_OP, busy=3, ceiling=1, requested=3)
    assert forced.threads == 3 and forced.line() == "threads: 3 (2 usable cores; --threads 3)"


def test_cgroup_quota_readers(tmp_path):
    assert tp.parse_cpu_max("max 100000\n") is None
    assert tp.parse_cpu_max("150000 100000\n") == 1.5
    assert tp.parse_cfs("-1", "100000") is None
    assert tp.parse_cfs("200000\n", "100000\n") == 2.0
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert tp.read_quota(v2) == 0.5
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert tp.read_quota(tmp_path / "v1") == 3.0
    assert tp.read_quota(tmp_path / "none") is None


def test_proc_readers():
    assert tp.parse_procs_running("cpu  1 2 3\nprocs_running 7\nprocs_blocked 0\n") == 7
    assert tp.parse_task_state("4242 (odd) name) R 1 4242 4242 0 -1") == "R"
    assert tp.parse_task_state("4242 (python) S 1 4242") == "S"
    assert tp.other_runnable(samples=1) >= 0


def test_measure_work_finds_the_largest_op_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model.train()
    before = model[1].running_mean.clone()
    work = tp.measure_work(model, (1, 8, 8), batch=32)
    # conv1: 16 x 8 x 8 outputs x (1 x 3 x 3) = 9,216; conv2: 8 x 4 x 4 x (16 x 9) = 18,432; linear: 1,280
    assert work == OpWork(18432 * 32, "conv 8x4x4 at batch 32")
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_governor_applies_a_request_and_restores_the_process_setting():
    assert torch.get_num_threads() == 1
    lines: list[str] = []
    with tp.request(3):
        with tp.ThreadGovernor(DIGITS_OP, say=lines.append) as governor:
            assert torch.get_num_threads() == 3
            governor.poll()  # a request is never re-decided
            assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1
    assert lines == ["threads: 3 (" + lines[0].split("(", 1)[1]] and "--threads 3" in lines[0]
    with tp.ThreadGovernor(CIFAR_OP):  # no request: the suite's 1 thread is the ceiling
        assert torch.get_num_threads() == 1


def test_governor_sees_a_competitor_after_one_slow_step_and_takes_two_quiet_checks_to_come_back(monkeypatch):
    busy, clock, lines = [0], [100.0], []
    monkeypatch.setattr(tp, "machine_choice", lambda work, *, ceiling: choose_threads(
        2, 2, None, None, work, busy=busy[0], ceiling=ceiling))
    torch.set_num_threads(2)
    try:
        with tp.ThreadGovernor(DIGITS_OP, say=lines.append, clock=lambda: clock[0]) as governor:
            assert governor.threads == 2  # idle machine: a 4.7M op takes both cores

            def step(seconds: float) -> None:
                clock[0] += seconds
                governor.poll()

            for _ in range(5):
                step(0.01)
            busy[0] = 1  # a competitor starts
            step(0.02)  # twice the typical step: not yet a sign
            assert governor.threads == 2
            step(0.10)  # ten times: re-checked at once, long before the 2 s re-check
            assert governor.threads == 1 and "1 other runnable task" in lines[-1]
            busy[0] = 0
            step(2.1)  # one quiet check is not enough to raise (a short lull must not flap the count)
            assert governor.threads == 1
            step(2.1)
            assert governor.threads == 2
        assert [line.split(" ")[1] for line in lines] == ["2", "1", "2"]
        assert torch.get_num_threads() == 2  # the process's own setting is put back
    finally:
        torch.set_num_threads(1)


def test_a_slow_step_on_one_thread_costs_no_check(monkeypatch):
    calls, clock = [], [0.0]
    monkeypatch.setattr(tp, "machine_choice", lambda work, *, ceiling: calls.append(1) or choose_threads(
        2, 2, None, None, work, busy=1, ceiling=ceiling))
    torch.set_num_threads(2)
    try:
        with tp.ThreadGovernor(DIGITS_OP, clock=lambda: clock[0]) as governor:
            assert governor.threads == 1
            for gap in (0.01, 0.01, 0.01, 0.5, 0.01):
                clock[0] += gap
                governor.poll()
        assert len(calls) == 1  # only the choice on entry: a slow step at one thread has nothing to drop
    finally:
        torch.set_num_threads(1)


def _threads_in_log(path: Path) -> list[int]:
    return [json.loads(line)["threads"] for line in path.read_text().splitlines()]


# one training step each: a run at 2 threads on a busy machine is what the policy avoids (slow)
ONE_STEP = ["--arch", "resnet8", "--data", "digits", "--epochs", "1", "--batch-size", "144", "--val-fraction", "0.9"]


@pytest.fixture(scope="module")
def auto_teacher(tmp_path_factory) -> tuple[Path, str]:
    from click.testing import CliRunner

    from recipes.cli import cli as root

    out = tmp_path_factory.mktemp("threads") / "teacher.pt"
    result = CliRunner().invoke(root, ["train", *ONE_STEP, "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_auto_policy_is_said_and_recorded(auto_teacher):
    out, output = auto_teacher
    assert _threads_in_log(Path(str(out) + ".jsonl")) == [1]  # the suite's one thread is the ceiling
    assert "threads: 1 (" in output
    assert torch.get_num_threads() == 1


def test_train_threads_flag_is_honoured(cli, tmp_path):
    out = tmp_path / "t.pt"
    result = cli("train", *ONE_STEP, "--threads", "2", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert _threads_in_log(Path(str(out) + ".jsonl")) == [2]
    assert "threads: 2 (" in result.output and "--threads 2)" in result.output
    assert torch.get_num_threads() == 1 and tp.requested() is None  # put back after the run


def test_distill_threads_flag_is_honoured(cli, auto_teacher, tmp_path):
    out = tmp_path / "s.pt"
    result = cli("distill", "--teacher", str(auto_teacher[0]), "--student", "resnet8", "--epochs", "1",
                 "--batch-size", "1294", "--threads", "2", "-q", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert _threads_in_log(tmp_path / "s.pt.run" / "stages" / "student" / "log.jsonl") == [2]
    assert torch.get_num_threads() == 1


def test_main_command_threads_option_holds_for_what_runs_under_it(cli, tmp_path):
    out = tmp_path / "g.pt"
    result = cli("--threads", "2", "train", *ONE_STEP, "-q", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert _threads_in_log(Path(str(out) + ".jsonl")) == [2]
    assert torch.get_num_threads() == 1 and tp.requested() is None


def test_importing_the_cli_loads_no_heavy_library():
    """`kdcompress --help` builds the whole CLI and shows the main command's options: none of these may
    load for it (a command's own --help may: `train --help` lists the data sources from their registry)."""
    heavy = ["torch", "onnx", "onnxruntime", "matplotlib", "fvcore", "sklearn", "torchvision", "scipy"]
    code = ("import sys, contextlib, io\n"
            "from recipes.cli import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--help'], prog_name='kdcompress', standalone_mode=False)\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_help_lists_every_registered_export_target_without_importing_them():
    from export.targets import target_names
    from recipes.cli._options import target_file_names

    assert target_file_names() == target_names()


def test_usable_cores_for_a_benchmark_ignore_the_thread_setting():
    assert tp.usable_cores(8, 8, 2.0) == 2 and tp.usable_cores(8, 3, None) == 3 and tp.usable_cores(8, 8, None, "1") == 1
    assert tp.machine_cores() == tp.usable_cores(os.cpu_count() or 1, tp.read_affinity(), tp.read_quota())


class _RecordsThreads(nn.Module):
    """A conv net that notes the intra-op thread count of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16 * 8 * 8, 10)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.head(self.conv(x).flatten(1))


def test_a_bare_evaluation_chooses_its_threads_and_one_under_a_run_does_not(monkeypatch):
    from compressor.batch import Batch
    from compressor.trainer.evaluate import evaluate

    monkeypatch.setattr(tp, "machine_choice", lambda work, *, ceiling: choose_threads(
        2, 2, None, None, work, busy=1, ceiling=ceiling))
    model = _RecordsThreads()
    batches = [Batch(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)), torch.arange(4)) for _ in range(2)]
    torch.set_num_threads(2)
    try:
        evaluate(model, batches, 10)
        # the batch-1 probe of the op sizes runs on one thread, then both batches at the shared machine's one
        assert model.seen == [1, 1, 1] and torch.get_num_threads() == 2
        model.seen.clear()
        with tp.ThreadGovernor(None):  # a run's own governor: its validation keeps the run's count
            torch.set_num_threads(2)
            evaluate(model, batches, 10)
        assert model.seen == [2, 2]
    finally:
        torch.set_num_threads(1)
