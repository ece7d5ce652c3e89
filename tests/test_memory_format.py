"""Memory format on CPU (compressor/trainer/precision.py): the auto rule, and that channels_last
changes how fast, not what is learnt: one step's loss and gradients, every knowledge loss on
channels_last feature maps, checkpoints that load into contiguous models and export.

Tolerances (measured on the development machine, torch 2.14, 1 thread): one resnet8 step on a
digits-shaped batch gives loss and gradients that differ between the formats by 1.2e-6 relative
(L2 over all gradients), every knowledge loss by at most 2.3e-6 (gradients) and 2e-5 (a loss
term); the tests allow 1e-4. (Deeper nets at random init amplify rounding more, in both formats:
resnet20 at 3x32x32 differs by 4e-3, where contiguous fp32 itself is 6e-4 from float64.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compressor.batch import Batch
from compressor.knowledge import list_losses
from compressor.models import create
from compressor.schemes import Vanilla
from compressor.schemes.offline import Offline, freeze
from compressor.trainer import TrainConfig
from compressor.trainer.precision import Precision, resolve_precision, slow_conv_on_cpu

CPU = torch.device("cpu")
DIGITS = (1, 8, 8)
TOL = 1e-4


def _config(channels_last: str = "auto") -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=32, lr=0.1, channels_last=channels_last)


def _wide_conv_net(kernel: int = 3, groups: int = 1) -> nn.Sequential:
    """A 1x1 conv to 256 channels, then ``kernel`` x ``kernel`` over them (the conv the rule is about)."""
    return nn.Sequential(nn.Conv2d(3, 256, 1), nn.Conv2d(256, 8, kernel, padding=kernel // 2, groups=groups),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


# --- the auto rule -----------------------------------------------------------------------------

def test_auto_is_channels_last_for_a_resnet_on_cpu():
    p = resolve_precision(_config(), CPU, Vanilla(create("resnet8", num_classes=10, in_chans=1)), DIGITS)
    assert p.channels_last and p.dtype is None
    assert p.line() == "precision: fp32, channels_last (auto: conv net on CPU)"


def test_auto_stays_contiguous_for_a_wide_3x3_conv_on_a_map_of_16_pixels_or_fewer():
    net = _wide_conv_net()
    assert slow_conv_on_cpu([net], (3, 4, 4)) == "conv 256->8 3x3 on 4x4 maps is slower in channels_last"
    assert slow_conv_on_cpu([net], (3, 5, 5)) is None  # 25 pixels
    assert slow_conv_on_cpu([_wide_conv_net(kernel=1)], (3, 2, 2)) is None  # a 1x1 conv
    assert slow_conv_on_cpu([_wide_conv_net(groups=2)], (3, 2, 2)) is None  # 128 channels per group
    p = resolve_precision(_config(), CPU, Vanilla(net), (3, 4, 4))
    assert not p.channels_last
    assert p.line() == ("precision: fp32, contiguous (auto on CPU: conv 256->8 3x3 on 4x4 maps is slower in "
                        "channels_last)")
    assert resolve_precision(_config(), CPU, Vanilla(net), (3, 8, 8)).channels_last


def test_auto_looks_at_the_teacher_too_and_at_the_zoo_nets_measured_slower():
    # resnet32x4 on digits runs 256-channel 3x3 convs at 2x2 (benchmarks: 0.94x); at 32x32 they run at 8x8
    wide = create("resnet32x4", num_classes=10, in_chans=1)
    assert "conv 256->256 3x3 on 2x2" in resolve_precision(_config(), CPU, Vanilla(wide), DIGITS).reason
    assert resolve_precision(_config(), CPU, Vanilla(create("resnet32x4", num_classes=10)), (3, 32, 32)).channels_last
    pair = Offline(freeze(create("vgg8", num_classes=10, in_chans=1)), create("resnet8", num_classes=10, in_chans=1),
                   [("hinton", 1.0)], input_shape=DIGITS, num_classes=10, num_train=64)
    assert not resolve_precision(_config(), CPU, pair, DIGITS).channels_last


def test_the_setting_overrides_auto_and_nets_without_convs_stay_contiguous():
    vgg = Vanilla(create("vgg8", num_classes=10, in_chans=1))
    resnet = Vanilla(create("resnet8", num_classes=10, in_chans=1))
    on = resolve_precision(_config("on"), CPU, vgg, DIGITS)
    assert on.channels_last and on.reason == "channels_last: on"
    assert not resolve_precision(_config("off"), CPU, resnet, DIGITS).channels_last
    mlp = Vanilla(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    assert resolve_precision(_config("on"), CPU, mlp, DIGITS).reason == "no conv layers"
    unknown = resolve_precision(_config(), CPU, resnet, None)
    assert not unknown.channels_last and unknown.reason == "auto: input size unknown on CPU"
    wrong = resolve_precision(_config(), CPU, Vanilla(create("resnet8", num_classes=10, in_chans=3)), DIGITS)
    assert not wrong.channels_last and "does not run on 1x8x8" in wrong.reason


def test_the_check_changes_no_state():
    model = create("resnet8", num_classes=10, in_chans=1).train()
    bn = model.bn1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resolve_precision(_config(), CPU, Vanilla(model), DIGITS)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and bn.num_batches_tracked == 0


# --- same results in both formats ---------------------------------------------------------------

def _batch(n: int = 32, shape=DIGITS, classes: int = 10) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g), torch.arange(n))


def _step(build, channels_last: bool, batch: Batch):
    """One training step as the trainer takes it: (loss terms, gradients, parameters after SGD)."""
    precision = Precision(CPU, None, channels_last)
    torch.manual_seed(0)
    scheme = precision.prepare_module(build()).train()
    params = [p for p in scheme.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    torch.manual_seed(2)  # losses that draw (CRD's negatives, BSS) draw alike in both arms
    losses = scheme(Batch(precision.prepare_input(batch.x), batch.y, batch.index))
    sum(losses.values()).backward()
    names = [n for n, p in scheme.named_parameters() if p.grad is not None]
    grads = {n: p.grad.clone() for n, p in scheme.named_parameters() if p.grad is not None}
    opt.step()
    return {k: v.item() for k, v in losses.items()}, grads, dict(scheme.named_parameters()), names


def _rel(a: dict, b: dict, names: list[str]) -> float:
    va, vb = torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names])
    return ((va - vb).norm() / vb.norm()).item()


def test_one_training_step_agrees_in_both_formats():
    def build():
        return Vanilla(create("resnet8", num_classes=10, in_chans=1))

    batch = _batch()
    loss0, grads0, params0, names = _step(build, False, batch)
    loss1, grads1, params1, _ = _step(build, True, batch)
    conv = params1["model.layer1.0.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # really channels_last
    assert abs(loss1["ce"] - loss0["ce"]) <= TOL * abs(loss0["ce"])
    assert _rel(grads1, grads0, names) <= TOL
    assert _rel({n: p.detach() for n, p in params1.items()}, {n: p.detach() for n, p in params0.items()}, names) <= TOL


@pytest.mark.parametrize("method", list_losses())
def test_every_knowledge_loss_agrees_on_channels_last_features(method):
    def build():
        teacher = freeze(create("resnet20", num_classes=10, in_chans=1))
        scheme = Offline(teacher, create("resnet8", num_classes=10, in_chans=1), [(method, 1.0)], input_shape=DIGITS,
                         num_classes=10, num_train=64, loss_options={"semckd": {"batch_size": 32}})
        scheme.bind_train_labels(torch.arange(64) % 10)
        return scheme

    batch = _batch()
    loss0, grads0, _, names = _step(build, False, batch)
    loss1, grads1, _, _ = _step(build, True, batch)
    assert loss1.keys() == loss0.keys()
    for term, value in loss0.items():
        assert abs(loss1[term] - value) <= TOL * max(abs(value), 1e-6), term
    assert _rel(grads1, grads0, names) <= TOL


def _channels_last_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


# --- checkpoints and export from a channels_last run --------------------------------------------

def test_a_channels_last_run_saves_a_checkpoint_that_loads_contiguous_and_exports(tmp_path):
    from _export_models import FAST
    from compressor.checkpoint import load_model
    from compressor.trainer import default_state_path
    from compressor.trainer.state import load_state
    from export.pipeline import export_model
    from recipes.training import train_vanilla

    out = tmp_path / "resnet8.pt"
    lines: list[str] = []
    train_vanilla("resnet8", "digits", out, epochs=1, progress="off", echo=lines.append)
    assert "precision: fp32, channels_last (auto: conv net on CPU)" in lines
    # the training state holds the weights as trained, in channels_last
    trained = load_state(default_state_path(out), map_location="cpu")["scheme"]
    assert trained["model.layer1.0.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    fresh = create("resnet8", num_classes=10, in_chans=1)
    fresh.load_state_dict({k[len("model."):]: v for k, v in trained.items()})
    assert fresh.layer1[0].conv1.weight.is_contiguous()  # loading copies into the model's own layout
    model = load_model(str(out)).model.eval()
    fresh.eval()
    x = _batch(16).x
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))  # one epoch: the best weights are the last
        # a model still in channels_last gives the same logits to float rounding
        assert torch.allclose(model(x), _channels_last_copy(model)(x), atol=1e-5)
    report = export_model(model, tmp_path / "resnet8.onnx", input_shape=DIGITS, exporter=FAST, log=None)
    assert report.parity.passed and report.parity.top1_agreement == 1.0
    kept = export_model(_channels_last_copy(model), tmp_path / "cl.onnx", input_shape=DIGITS, exporter=FAST,
                        log=None)
    assert kept.parity.passed
