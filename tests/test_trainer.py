"""The one trainer: schedules, optimisers, evaluation, the loop, exact resume, the NaN guard, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.schemes import Vanilla
from compressor.trainer import (
    LrSchedule,
    TrainConfig,
    TrainingDiverged,
    build_optimizer,
    fit,
    load_state,
    seed_everything,
)
from compressor.trainer.distributed import DistContext
from compressor.trainer.evaluate import Counts, evaluate_many
from compressor.trainer.progress import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def tiny_net(in_chans: int = 1, classes: int = 10, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from a second thread, and shared cores make it thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from compressor.data import load_source

    return load_source("digits", seed=0)


def quick_config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=64, lr=0.1, schedule="cosine", nesterov=True, weight_decay=5e-4,
                device="cpu", progress="off")
    base.update(kw)
    return TrainConfig(**base)


# --- schedules and optimisers --------------------------------------------------------------

def test_step_schedule_divides_at_milestones():
    sched = LrSchedule(TrainConfig(epochs=240, lr=0.05, schedule="step", milestones=(150, 180, 210), gamma=0.1))
    lr = lambda t: 0.05 * sched.factor(t)  # noqa: E731
    assert lr(0) == pytest.approx(0.05)
    assert lr(149.99) == pytest.approx(0.05)
    assert lr(150) == pytest.approx(0.005)
    assert lr(185) == pytest.approx(0.0005)
    assert lr(239) == pytest.approx(0.00005)


def test_cosine_schedule_endpoints_and_midpoint_with_warmup():
    c = TrainConfig(epochs=12, lr=0.2, schedule="cosine", milestones=(), min_lr=0.0, warmup_epochs=2)
    sched = LrSchedule(c)
    assert sched.factor(0.0) == pytest.approx(0.1)  # warm-up starts at lr/10
    assert sched.factor(1.0) == pytest.approx(0.55)  # half-way through the linear warm-up
    assert sched.factor(2.0) == pytest.approx(1.0)
    assert sched.factor(7.0) == pytest.approx(0.5)  # half-way through the cosine
    assert sched.factor(12.0) == pytest.approx(0.0, abs=1e-12)


def test_plateau_reduces_after_patience_and_round_trips():
    sched = LrSchedule(TrainConfig(epochs=20, schedule="constant", plateau_patience=2, plateau_factor=0.1))
    for metric in (50.0, 60.0, 59.0, 58.0):  # two epochs without improvement after 60
        sched.end_epoch(metric)
    assert sched.factor(4.0) == pytest.approx(0.1)
    again = LrSchedule(sched.config)
    again.load_state_dict(sched.state_dict())
    assert again.factor(4.0) == pytest.approx(0.1)


def test_optimizer_groups_scale_lr_and_sgd_uses_nesterov():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.1, nesterov=True, momentum=0.9, weight_decay=1e-4)
    opt = build_optimizer([{"params": a.parameters()}, {"params": b.parameters(), "lr_scale": 0.5,
                                                        "weight_decay": 0.0}], cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["base_lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.05)]
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[1]["weight_decay"] == 0.0
    adam = build_optimizer([{"params": a.parameters()}], TrainConfig(optimizer="adam", lr=1e-3))
    assert isinstance(adam, torch.optim.Adam)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizers_step_and_save_as_torch_optim_does(name):
    """build_optimizer's classes skip torch.compile's guards (their import of torch._dynamo): the
    same parameters after each step, the same state dict, the same state after loading it."""
    torch.manual_seed(0)
    ours_net, stock_net = nn.Linear(3, 2), nn.Linear(3, 2)
    stock_net.load_state_dict(ours_net.state_dict())
    cfg = TrainConfig(optimizer=name, lr=0.05, momentum=0.9, nesterov=name == "sgd", weight_decay=1e-3)
    ours = build_optimizer([{"params": ours_net.parameters()}], cfg)
    stock_cls = type(ours).__mro__[1]
    assert type(ours).__name__ == stock_cls.__name__ and stock_cls.__module__.startswith("torch.optim")
    stock = stock_cls(stock_net.parameters())
    stock.param_groups[0].update({k: v for k, v in ours.param_groups[0].items() if k != "params"})
    x = torch.randn(8, 3)
    for step in range(3):
        for net, opt in ((ours_net, ours), (stock_net, stock)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(ours_net.parameters(), stock_net.parameters())), step
    saved = ours.state_dict()
    for key, value in stock.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(saved["state"][0][key]), torch.as_tensor(value)), key
    again = build_optimizer([{"params": ours_net.parameters()}], cfg)
    again.load_state_dict(saved)
    assert again.state_dict()["param_groups"] == saved["param_groups"]


def test_training_never_imports_torch_dynamo():
    """Its import costs about as much as importing torch; nothing here compiles."""
    code = ("import sys, torch, torch.nn as nn\n"
            "from compressor.trainer.optim import build_optimizer\n"
            "from compressor.trainer import TrainConfig\n"
            "net = nn.Linear(2, 2)\n"
            "opt = build_optimizer([{'params': net.parameters()}], TrainConfig())\n"
            "net(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "opt.load_state_dict(opt.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_config_rejects_nonsense_with_one_clear_line():
    with pytest.raises(UserError, match="unknown optimizer 'sgdd'"):
        TrainConfig(optimizer="sgdd")
    with pytest.raises(UserError, match="milestones must be increasing"):
        TrainConfig(milestones=(180, 150))
    with pytest.raises(UserError, match="unknown training setting"):
        TrainConfig.from_dict({"epochz": 3})


# --- evaluation ------------------------------------------------------------------------------

def test_counts_top1_top5_per_class_on_a_hand_made_case():
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 6],  # y=0: top-1 hit
        [0.0, 1, 2, 3, 4, 5, 6],  # y=2: in top-5 (6,5,4,3,2), not top-1
        [0.0, 1, 2, 3, 4, 5, 6],  # y=0: outside top-5
        [0.0, 9, 2, 3, 4, 5, 6],  # y=1: top-1 hit
    ])
    y = torch.tensor([0, 2, 0, 1])
    counts = Counts(7, torch.device("cpu"))
    counts.add(logits, y)
    r = counts.result()
    assert r.top1 == pytest.approx(50.0) and r.top5 == pytest.approx(75.0) and r.count == 4
    assert r.per_class[:3] == [pytest.approx(50.0), pytest.approx(100.0), pytest.approx(0.0)]
    assert math.isnan(r.per_class[3]) and r.per_class_count[:3] == [2, 1, 1]
    assert r.loss == pytest.approx(F.cross_entropy(logits, y).item())


class _FakeDist(DistContext):
    """A rank of a 2-process run whose collectives are the identity (to test the padding mask)."""

    def all_reduce_sum(self, tensor):
        return tensor


def test_sharded_evaluation_does_not_count_the_padding_repeats():
    # 5 samples over 2 ranks: the padded order is 0..4,0; rank 1 sees 1, 3 and the repeat of 0
    model = nn.Identity()
    model.register_parameter("p", nn.Parameter(torch.zeros(1)))
    x = torch.eye(3)[[1, 1, 0]]  # rank 1's samples (positions 1, 3, 0): predictions 1, 1, 0
    batches = [Batch(x, torch.tensor([1, 1, 0]), torch.tensor([1, 3, 0]))]
    ctx = _FakeDist(rank=1, world_size=2)
    r = evaluate_many({"m": model}, batches, 3, ctx=ctx, num_samples=5)["m"]
    assert r.count == 2  # the third sample is padded position 5 >= 5
    r0 = evaluate_many({"m": model}, batches, 3, ctx=_FakeDist(rank=0, world_size=2), num_samples=5)["m"]
    assert r0.count == 3


# --- the loop --------------------------------------------------------------------------------

def test_a_few_epochs_on_digits_beat_chance_by_far_and_log_every_epoch(digits, tmp_path):
    seed_everything(0)
    state, log = tmp_path / "m.pt.state", tmp_path / "m.pt.jsonl"
    result = fit(Vanilla(tiny_net(width=16)), digits, quick_config(epochs=4, lr=0.2), state_path=state,
                 log_path=log)
    assert result.test is not None and result.test.count == digits.split_size("test")
    assert result.test.top1 > 70.0  # chance is 10%
    assert result.test.top5 >= result.test.top1
    records = read_jsonl(log)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for key in ("lr", "loss", "loss_terms", "train_top1", "val_top1", "val_top5", "images_per_s", "time_s"):
        assert key in records[0]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["loss_terms"]["ce"] == pytest.approx(records[0]["loss"])
    # the deployable holds the best-on-validation epoch's weights
    best = max(range(4), key=lambda i: (records[i]["val_top1"], -i))
    assert result.best_epoch == best + 1
    saved = load_state(state)  # weights_only=True inside
    assert saved["epoch"] == 4 and saved["seed"] == 0 and saved["best"]["epoch"] == best + 1
    for k, v in saved["best"]["state_dict"].items():
        assert torch.equal(v, result.deployable.state_dict()[k].cpu())


class NaNAt(Vanilla):
    """Cross-entropy that turns NaN at one (epoch, step), both 0-based."""

    def __init__(self, model, epoch, step):
        super().__init__(model)
        self.when, self.epoch, self.step = (epoch, step), -1, 0

    def start_epoch(self, epoch, num_epochs):
        self.epoch, self.step = epoch, 0

    def forward(self, batch):
        losses = super().forward(batch)
        if (self.epoch, self.step) == self.when:
            losses["ce"] = losses["ce"] * float("nan")
        self.step += 1
        return losses


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_state(digits, tmp_path):
    state = tmp_path / "m.pt.state"
    seed_everything(0)
    with pytest.raises(TrainingDiverged) as info:
        fit(NaNAt(tiny_net(), epoch=1, step=3), digits, quick_config(epochs=3), state_path=state)
    message = str(info.value)
    assert "epoch 2, step 4 of" in message and "ce=nan" in message and str(state) in message
    assert info.value.last_good_epoch == 1
    kept = load_state(state)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["scheme"].values()
                                      if v.is_floating_point())


def test_resume_of_a_finished_run_trains_nothing_more(digits, tmp_path):
    state = tmp_path / "m.pt.state"
    seed_everything(0)
    first = fit(Vanilla(tiny_net()), digits, quick_config(), state_path=state)
    seed_everything(1)  # a different init: resume must overwrite it with the saved weights
    again = fit(Vanilla(tiny_net()), digits, quick_config(), state_path=state, resume=True)
    assert len(again.history) == 2 and again.test.top1 == first.test.top1
    for k, v in first.deployable.state_dict().items():
        assert torch.equal(v, again.deployable.state_dict()[k])


def test_frozen_modules_stay_in_eval_mode_and_out_of_the_optimizer(digits):
    class WithTeacher(Vanilla):
        def __init__(self, model, teacher):
            super().__init__(model)
            self.teacher = teacher
            self.modes = []

        def frozen_modules(self):
            return [self.teacher]

        def forward(self, batch):
            self.modes.append(self.teacher.training)
            with torch.no_grad():
                self.teacher(batch.x)
            return super().forward(batch)

    teacher = tiny_net()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    scheme = WithTeacher(tiny_net(), teacher)
    fit(scheme, digits, quick_config(epochs=1))
    assert scheme.modes and not any(scheme.modes)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats too


# --- the CLI: train, eval, exact resume after a kill, errors ---------------------------------

def _env() -> dict[str, str]:
    # one thread per process: identical arithmetic in every run, and no thrashing on shared cores
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


TRAIN_ARGS = ["--arch", "resnet_d8_w0.5", "--data", "digits", "--epochs", "4", "--batch-size", "128",
              "--lr", "0.1", "--seed", "3", "--device", "cpu", "--quiet"]


def test_resume_after_a_kill_gives_exactly_the_uninterrupted_weights(tmp_path, cli):
    # the interrupted run is a real process, killed with SIGKILL after its 2nd epoch's log line
    cut = tmp_path / "cut.pt"
    log = Path(str(cut) + ".jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "train", *TRAIN_ARGS, "-o", str(cut)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(read_jsonl(log)) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be interrupted: {err[-2000:]}"
    assert not cut.exists()
    assert 2 <= load_state(str(cut) + ".state")["epoch"] < 4

    # the uninterrupted run and the resumption run in this process (same single thread)
    whole = tmp_path / "whole.pt"
    done = cli("train", *TRAIN_ARGS, "-o", str(whole))
    assert done.exit_code == 0, done.output
    assert "test top-1" in done.output
    resumed = cli("train", *TRAIN_ARGS, "-o", str(cut), "--resume")
    assert resumed.exit_code == 0, resumed.output

    a = torch.load(whole, weights_only=True)
    b = torch.load(cut, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa = load_state(str(whole) + ".state")["scheme"]
    sb = load_state(str(cut) + ".state")["scheme"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert read_jsonl(log)[-1]["loss"] == read_jsonl(str(whole) + ".jsonl")[-1]["loss"]
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2, 3, 4]
    assert a["metrics"]["seed"] == 3 and a["metrics"]["test_top1"] == b["metrics"]["test_top1"]

    # the file is a model checkpoint every later command reads; eval scores it on the test split
    scored = cli("eval", str(whole), "--json")
    assert scored.exit_code == 0, scored.output
    figures = json.loads(scored.output)
    assert figures["top1"] == pytest.approx(a["metrics"]["test_top1"]) and figures["count"] == 359
    assert set(figures["per_class"]) == {str(d) for d in range(10)}


def test_cli_divergence_exits_non_zero_with_one_line(tmp_path, cli):
    out = tmp_path / "nan.pt"
    r = cli("train", "--arch", "resnet_d8_w0.5", "--epochs", "1", "--lr", "1e30", "--batch-size", "256",
            "--device", "cpu", "--quiet", "-o", str(out))
    assert r.exit_code == 2
    assert "diverged" in r.output and "epoch 1, step" in r.output
    assert not out.exists()


def test_eval_says_clearly_when_classes_or_input_shape_do_not_fit(tmp_path, cli):
    from compressor.checkpoint import ModelMeta, save_model
    from compressor.models import create

    hundred = tmp_path / "c100.pt"
    save_model(hundred, create("resnet8", num_classes=100, in_chans=1),
               ModelMeta(arch="resnet8", num_classes=100, in_chans=1, input_size=(8, 8)))
    r = cli("eval", str(hundred), "--data", "digits")
    assert r.exit_code == 2 and "predicts 100 classes but digits has 10" in r.output

    rgb = tmp_path / "rgb.pt"
    save_model(rgb, create("resnet8", num_classes=10, in_chans=3),
               ModelMeta(arch="resnet8", num_classes=10, in_chans=3, input_size=(32, 32)))
    r = cli("eval", str(rgb), "--data", "digits")
    assert r.exit_code == 2 and "3-channel images but digits has 1-channel" in r.output


# --- DDP: two CPU processes (gloo) on digits ---------------------------------------------------

DDP_SCRIPT = r'''
import json, os, sys
import torch
from compressor.data import load_source
from compressor.schemes import Vanilla
from compressor.trainer import TrainConfig, fit, seed_everything, session

out = sys.argv[1]

class Recording(Vanilla):
    seen = []
    def forward(self, batch):
        self.seen.extend(batch.index.tolist())
        return super().forward(batch)

with session("cpu") as ctx:
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    src = load_source("digits", seed=0)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, schedule="constant", device="cpu", progress="off")
    scheme = Recording(model)
    result = fit(scheme, src, cfg, state_path=os.path.join(out, "state"), ctx=ctx)
    weights = {k: v.sum().item() for k, v in result.deployable.state_dict().items()}
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as fh:
        json.dump({"world": ctx.world_size, "seen": scheme.seen, "metrics": result.metrics(),
                   "history": result.history, "weights": weights}, fh)

from recipes.training import train_vanilla  # what `kdcompress train` runs
train_vanilla("resnet_d8_w0.5", "digits", os.path.join(out, "ddp.pt"), epochs=2, batch_size=128, device="cpu",
              progress="off")
'''


def test_ddp_two_cpu_processes_split_the_data_and_agree(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(rank["world"] == 2 for rank in ranks)
    n = 1294  # digits' training split at val_fraction 0.1
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(a & b) == 0 and a | b == set(range(n))  # disjoint halves that cover the split
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # all-reduced: both ranks report the same
    assert ranks[0]["metrics"]["test_count"] == 359  # the whole test split, not one shard
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged: one model
    assert (tmp_path / "state").exists()
    assert (tmp_path / "ddp.pt").exists() and len(read_jsonl(tmp_path / "ddp.pt.jsonl")) == 2
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert saved["extra"]["world_size"] == 2 and saved["metrics"]["test_count"] == 359


def test_nonfinite_watch_finds_the_first_bad_step_in_a_deferred_window():
    from compressor.trainer.loop import _NonFiniteWatch

    watch = _NonFiniteWatch(torch.device("cpu"), every=4)  # the accelerator path, on the CPU
    found = []
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, float("inf"), float("nan"), 8.0, 9.0]
    for step, value in enumerate(losses):
        watch.record(step, torch.tensor(value))
        if watch.due(step, len(losses)):
            found.append((step, watch.first_bad(step)))
    assert found == [(3, None), (7, 5), (8, None)]
