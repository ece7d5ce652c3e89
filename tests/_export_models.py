"""Small models and helpers shared by the tests/test_export*.py files (not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
import torch.nn as nn

FAST = "torchscript"  # exports in well under a second; dynamo is exercised where the exporter matters


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class Shuffled(SmallNet):
    """A ShuffleNet-style channel shuffle: TorchScript exports its reshapes as Shape/Gather chains."""

    def forward(self, x):
        x = self.features[:6](x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.features[6:](x))


class HistPool(nn.Module):
    """torch.histc has no ONNX translation in either exporter."""

    def forward(self, x):
        return x.mean((2, 3)) + torch.histc(x, bins=4).sum()


class WithHist(SmallNet):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__(num_classes, in_chans, width)
        self.head = nn.Sequential(nn.Identity(), HistPool())

    def forward(self, x):
        return self.fc(self.head(self.features[:6](x)))


class Noisy(SmallNet):
    """Exports fine (RandomUniformLike) but can never match PyTorch: a parity failure on demand."""

    def forward(self, x):
        logits = super().forward(x)
        return logits + 10 * torch.rand_like(logits)


class DataDependent(SmallNet):
    """Python control flow on a tensor value: torch.export refuses it, the TorchScript tracer bakes it in."""

    def forward(self, x):
        logits = super().forward(x)
        if x.abs().sum() > 0:
            return logits
        return -logits


def train_on_digits(model: nn.Module, source, epochs: int) -> nn.Module:
    """Plain SGD on the digits training split, unaugmented (seconds on CPU): a model whose accuracy
    int8 and parity checks can see move."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for batch in source.loader("train", 64, shuffle=True, augment=False, epoch=epoch):
            loss = nn.functional.cross_entropy(model(batch.x), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def digits_net(epochs: int, prepare: Callable[[nn.Module], None] | None = None):
    """A 16-wide SmallNet trained on digits with :func:`train_on_digits` from seed 0, and the digits
    source; ``prepare`` edits the fresh model before training."""
    from compressor.data import load_source

    source = load_source("digits", seed=0)
    torch.manual_seed(0)
    model = SmallNet(num_classes=10, in_chans=1, width=16)
    if prepare is not None:
        prepare(model)
    train_on_digits(model, source, epochs)
    return model.eval(), source


def seeded(model: nn.Module) -> nn.Module:
    """Deterministic weights and non-trivial BatchNorm statistics (so folding BN is really tested)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def registered():
    """Register test architectures by name (checkpoints need a name) and remove them afterwards."""
    from compressor.models import registry

    added = []

    def register(name: str, factory) -> str:
        if name not in registry._MODELS:
            registry.add_model(name, factory, family="export-test", searchable=False)
            added.append(name)
        return name

    yield register
    for name in added:
        registry._MODELS.pop(name, None)


def make_checkpoint(folder: Path, name: str, model: nn.Module, *, shape=(3, 16, 16), **arch_kwargs) -> Path:
    from compressor.checkpoint import ModelMeta, save_model

    meta = ModelMeta(arch=name, num_classes=10, in_chans=shape[0], input_size=shape[1:], mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.25, 0.3), class_names=[f"class{i}" for i in range(10)], arch_kwargs=arch_kwargs)
    path = folder / f"{name}.pt"
    save_model(path, model, meta, metrics={"test_acc": 0.5})
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted write would leave (atomic_output names them .NAME.XXXX.tmp)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def unfolded_batch_norms(proto: onnx.ModelProto) -> list[str]:
    """BatchNormalization nodes fed by a Conv that feeds nothing else (those could have been folded).

    Pre-activation blocks (WRN: BN -> ReLU -> Conv) keep BNs that no convolution precedes.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    return [
        node.name for node in proto.graph.node
        if node.op_type == "BatchNormalization"
        and getattr(producer.get(node.input[0]), "op_type", None) == "Conv"
        and consumers.get(node.input[0]) == 1
    ]


def check_family_export(arch: str, folder: Path) -> None:
    """A zoo model exports with the default (dynamo) exporter, passes parity and has its BNs folded."""
    from compressor.models import create
    from export.metadata import read_metadata
    from export.pipeline import export_model

    torch.manual_seed(0)
    model = create(arch, num_classes=100).eval()
    out = folder / "m.onnx"
    report = export_model(model, out, input_shape=(3, 32, 32), measure_cost=False, log=None)
    assert report.exporter == "dynamo" and report.graph.notes == []  # no fallback was needed
    assert report.parity.passed and report.parity.max_abs_diff <= 1e-4 and report.parity.top1_agreement == 1.0
    proto = onnx.load(str(out))
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 100
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert unfolded_batch_norms(proto) == []  # every BN right after a convolution is folded into it
    assert read_metadata(out).input_size == [32, 32]
