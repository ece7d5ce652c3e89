"""Checkpoint round-trips, foreign formats, and every refusal a user can hit."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from compressor.checkpoint import ModelMeta, arch_from_path, load_model, save_model
from compressor.errors import UserError
from compressor.models import create


def _meta(arch: str = "resnet8", num_classes: int = 10) -> ModelMeta:
    return ModelMeta(arch=arch, num_classes=num_classes, in_chans=1, input_size=(8, 8), mean=(0.5,), std=(0.25,),
                     dataset="digits", class_names=[str(i) for i in range(num_classes)])


def test_round_trip_keeps_weights_and_meta(tmp_path):
    model = create("resnet8", num_classes=10, in_chans=1)
    path = tmp_path / "m.pt"
    save_model(path, model, _meta(), metrics={"test_top1": 0.9}, plan={"stages": 1})
    loaded = load_model(path)
    assert loaded.meta == _meta()
    assert loaded.metrics == {"test_top1": 0.9} and loaded.plan == {"stages": 1}
    assert loaded.source_format == "kdcompress"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not loaded.model.training
    # our own format never needs unpickling code
    torch.load(path, weights_only=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_the_same_content_gives_the_same_bytes_however_its_strings_are_shared(tmp_path):
    # a plan as the planner builds it (one family string object in every row) and the same plan read
    # back from plan.yaml by a resumed run (a string object per row): the checkpoints were 19.7 KB and
    # 35.0 KB for the same student (issue 18: a resumed run's student.pt differed in its bytes)
    import yaml

    family = "resnet_" + "cifar"
    built = {"candidates": [{"name": f"m{i}", "family": family} for i in range(50)]}
    read = yaml.safe_load(yaml.safe_dump(built, sort_keys=False))
    assert read == built and read["candidates"][0]["family"] is not read["candidates"][1]["family"]
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_chans=1)
    save_model(tmp_path / "built.pt", model, _meta(), metrics={"select": "val_top1"}, plan=built)
    save_model(tmp_path / "read.pt", model, _meta(), metrics={"select": "val_top1"}, plan=read)
    assert (tmp_path / "built.pt").read_bytes() == (tmp_path / "read.pt").read_bytes()
    assert load_model(tmp_path / "read.pt").plan == built


def test_repdistiller_dict_loads_with_arch_from_folder(tmp_path):
    model = create("resnet8", num_classes=7)
    folder = tmp_path / "resnet8_vanilla"
    folder.mkdir()
    path = folder / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": torch.tensor(71.5)}, path)
    loaded = load_model(path)
    assert loaded.meta.arch == "resnet8" and loaded.meta.num_classes == 7
    assert loaded.source_format == "repdistiller" and loaded.metrics["best_acc"] == pytest.approx(71.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded.model(x), model(x))


def test_bare_state_dict_needs_arch(tmp_path):
    model = create("resnet8", num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # DataParallel prefix
    with pytest.raises(UserError, match="--arch"):
        load_model(path)
    assert load_model(path, arch="resnet8").meta.num_classes == 5


def test_arch_from_path_takes_longest_known_prefix():
    assert arch_from_path("save/models/wrn_40_2_cifar100_lr_0.05/ckpt.pth") == "wrn_40_2"
    assert arch_from_path("x/resnet32x4_vanilla/ckpt_epoch_240.pth") == "resnet32x4"
    assert arch_from_path("x/y/weights.pth") is None


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (random.Random(7).randbytes(512), "not a PyTorch checkpoint"), (None, "truncated")],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        save_model(path, create("resnet8", num_classes=10, in_chans=1), _meta())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_missing_file_and_wrong_weights(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    path = tmp_path / "r8.pth"
    torch.save(create("resnet8", num_classes=10).state_dict(), path)
    with pytest.raises(UserError, match="do not fit resnet20.*missing layer1.1"):
        load_model(path, arch="resnet20")
    with pytest.raises(UserError, match="predicts 10 classes but 100"):
        load_model(path, arch="resnet8", num_classes=100)
    with pytest.raises(UserError, match="unknown model"):
        load_model(path, arch="resnet9000")


class _Payload:
    """Unpickling this creates a file: the proof that a pickle runs code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Payload(str(marker))}, fh)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_model(path)
    assert not marker.exists()


def test_whole_module_loads_only_with_trust(tmp_path):
    model = create("resnet8", num_classes=4)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UserError, match="trust"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.source_format == "module" and loaded.meta.num_classes == 4


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    from tests.conftest import run_module_cli

    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a model at all")
    result = run_module_cli("flops", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_never_tracebacks_nor_passes_for_a_pickle(tmp_path):
    # torch's weights-only unpickler raises assorted errors on random bytes (IndexError among them);
    # every one must become the same one-line refusal
    for seed in range(60):
        path = tmp_path / f"{seed}.pt"
        path.write_bytes(random.Random(seed).randbytes(512))
        with pytest.raises(UserError, match="not a PyTorch checkpoint"):
            load_model(path)


def test_loading_a_checkpoint_never_imports_torch_dynamo(tmp_path):
    """The size guard builds the model on the meta device, where drawing normal values would
    import torch._dynamo (as long as importing torch); the draws are skipped there, weights load."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    paths = []
    for arch in ("resnet8", "MobileNetV2", "vgg8", "ShuffleV2"):  # kaiming_normal_ and nn.init.normal_(name=...)
        path = tmp_path / f"{arch}.pt"
        save_model(path, create(arch, num_classes=10), ModelMeta(arch=arch, num_classes=10, input_size=(32, 32)))
        paths.append(str(path))
    code = ("import sys\n"
            "from compressor.checkpoint import load_model\n"
            "for path in sys.argv[1:]:\n"
            "    load_model(path)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"
