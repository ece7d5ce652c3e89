"""DDP correctness of chains and cohorts (issue 18, item 6): a TA chain and a DML cohort trained by
two gloo processes (``torchrun --nproc_per_node 2``) end with the weights one process gets on the
same global batches, within float tolerance.

The global batch is the same when: the epoch's permutation depends on (seed, epoch) only; each
rank takes every second position of it, so at every step the two ranks' halves together are the
single process's batch (1294 digits training images split evenly, batch 64: no padding repeats
and the last batch of 14 splits 7 + 7); and a sample's augmentation depends on its position, not on
the rank that draws it (``compressor.data.order.augment_draws``). The losses here are per-sample
means (Hinton KD, DML's KL, cross-entropy), so the average of the two ranks' gradients is the
single process's gradient. The models are the zoo's LeNets, which have no BatchNorm: BatchNorm
normalises with each rank's own half batch (torch's SyncBatchNorm runs on GPUs only), so a model
with it is close to, not equal to, the single-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT

TRAIN = {"epochs": 2, "batch_size": 64, "lr": 0.05, "select": "last", "stop_when_not_learning": False,
         "progress": "off", "device": "cpu"}

SCRIPT = r'''
import sys
import torch
from compressor.checkpoint import load_model
from compressor.data import load_source
from recipes.plan import Plan
from recipes.runner import run_plan

out, plan_path = sys.argv[1:3]
plan = Plan.load(plan_path)
teacher = load_model(plan.teacher) if plan.teacher else None
result = run_plan(plan, load_source("digits", seed=plan.seed), out, teacher=teacher, device="cpu", echo=lambda _: None)
import torch.distributed as dist
torch.save(result.final.model.state_dict(), f"{out}/final.rank{dist.get_rank()}.pt")
'''


def _teacher(path: Path) -> str:
    from compressor.checkpoint import ModelMeta, save_model
    from compressor.models import create

    torch.manual_seed(0)
    save_model(path, create("osakd_fmnist_cnn", num_classes=10, in_chans=1),
               ModelMeta(arch="osakd_fmnist_cnn", num_classes=10, in_chans=1, input_size=(8, 8), mean=(0.5,),
                         std=(0.25,), dataset="digits", class_names=[str(i) for i in range(10)]))
    return str(path)


def _chain(tmp_path: Path) -> dict:
    teacher = _teacher(tmp_path / "teacher.pt")
    return {"data": "digits", "seed": 0, "teacher": teacher, "recipe": "takd", "stages": [
        {"name": "ta1", "scheme": "offline", "arch": "osakd_fmnist_cnn", "teachers": ["teacher"], "method": "hinton",
         "train": TRAIN},
        {"name": "student", "scheme": "offline", "arch": "osakd_cnn5", "teachers": ["ta1"], "method": "hinton",
         "train": TRAIN}]}


def _cohort(tmp_path: Path) -> dict:
    return {"data": "digits", "seed": 0, "recipe": "cohort", "stages": [
        {"name": "student", "scheme": "cohort", "arch": "osakd_cnn5", "options": {"cohort": 2, "aggregator": "dml"},
         "train": TRAIN}]}


@pytest.mark.parametrize("make_plan", [_chain, _cohort], ids=["ta-chain", "dml-cohort"])
def test_two_gloo_processes_train_what_one_process_trains_on_the_same_global_batches(tmp_path, make_plan):
    from compressor.checkpoint import load_model
    from compressor.data import load_source
    from recipes.plan import Plan
    from recipes.runner import run_plan

    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(make_plan(tmp_path)))
    script = tmp_path / "ddp_plan.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(ddp), str(plan_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    plan = Plan.load(plan_path)
    teacher = load_model(plan.teacher) if plan.teacher else None
    one = tmp_path / "one"
    single = run_plan(plan, load_source("digits", seed=0), one, teacher=teacher, device="cpu", echo=lambda _: None)

    ranks = [torch.load(ddp / f"final.rank{i}.pt", weights_only=True) for i in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # one model on both ranks
    reference = single.final.model.state_dict()
    for stage in plan.stages:  # every stage's model, not only the last: a chain's errors would compound
        a = load_model(ddp / "stages" / stage.name / "model.pt")
        b = load_model(one / "stages" / stage.name / "model.pt")
        for key, value in b.model.state_dict().items():
            other = a.model.state_dict()[key]
            assert torch.allclose(other, value, rtol=1e-4, atol=1e-5), \
                f"{stage.name}: {key} differs by {(other - value).abs().max():.3g}"
        assert a.metrics["test_top1"] == pytest.approx(b.metrics["test_top1"], abs=100 / 359)  # one image at most
        assert a.metrics["val_top1"] == pytest.approx(b.metrics["val_top1"], abs=100 / 144)
        state = torch.load(ddp / "stages" / stage.name / "state.pt", weights_only=True)
        assert state["world_size"] == 2  # it did train as two processes
        losses = [record["loss"] for record in state["history"]]
        assert losses[1] < losses[0]  # and it did train: equal because nothing moved would prove nothing
    for key, value in reference.items():
        assert torch.allclose(ranks[0][key], value, rtol=1e-4, atol=1e-5), key
