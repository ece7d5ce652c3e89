"""Zoo part B: CIFAR MobileNetV2 / ShuffleNetV1 / ShuffleNetV2 (RepDistiller keys), OSAKD's small
CNNs, and torchvision models behind the ``tv:`` prefix."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from compressor.cost import measure
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.models import aliases_of, canonical_name, create, list_models, resolve

FAMILIES = ("mobilenetv2", "shufflenetv1", "shufflenetv2", "osakd_cnn")
ALL_NAMES = sorted({n for f in FAMILIES for n in list_models(f)})


def _forward(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, *shape))


def test_every_family_registers_its_names():
    for expected in ("MobileNetV2", "mobile_half", "mobilenetv2_w0.5", "ShuffleV1", "ShuffleV2",
                     "shufflev2_w0.5", "shufflev2_w2", "osakd_cnn5", "osakd_fmnist_cnn"):
        assert expected in ALL_NAMES
    assert canonical_name("MobileNetV2") == "mobilenetv2_w0.5"
    assert canonical_name("ShuffleV2") == "shufflev2_w1"
    assert "MobileNetV2" in aliases_of("mobilenetv2_w0.5")
    assert list_models("mobilenetv2", searchable_only=True) == [
        "mobilenetv2_w0.25", "mobilenetv2_w0.35", "mobilenetv2_w0.5",
        "mobilenetv2_w0.75", "mobilenetv2_w1", "mobilenetv2_w1.4",
    ]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shape_small_and_cifar_inputs(name):
    for shape, classes in (((1, 8, 8), 7), ((3, 32, 32), 100)):
        model = create(name, num_classes=classes, in_chans=shape[0])
        assert model.kd_arch == name
        assert _forward(model, shape).shape == (2, classes)
        for attr in ("stem_name", "stage_names", "classifier_name"):
            assert hasattr(type(model), attr), f"{name} lacks class attribute {attr}"


# ----------------------------------------------------------------------------------------------
# Params and FLOPs. The expected figures are derived here by hand from RepDistiller's configuration
# tables (models/mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py), independently of our modules,
# under fvcore's convention in eval mode: conv and linear count one FLOP per multiply-add (biases
# free), BatchNorm 2 per element, adaptive average pooling 1 per input element; max/avg pooling,
# ReLU and residual adds are not counted. Rounded, the parameter counts are the CIFAR-100 figures of
# the KD literature: MobileNetV2 0.81M (CRD, Tian et al. 2020), ShuffleV1 0.95M, ShuffleV2 1.36M.
# ----------------------------------------------------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.params = 0
        self.flops = 0

    def conv(self, cin: int, cout: int, k: int, side: int, groups: int = 1, bn: bool = True) -> None:
        self.params += cin // groups * cout * k * k
        self.flops += cin // groups * cout * k * k * side * side
        if bn:
            self.params += 2 * cout
            self.flops += 2 * cout * side * side

    def head(self, channels: int, side: int, classes: int) -> None:
        self.flops += channels * side * side  # adaptive average pooling
        self.params += channels * classes + classes
        self.flops += channels * classes


def _mobilenetv2_cost(width: float, classes: int = 100, expand: int = 6) -> _Tally:
    table = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
             (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
    t = _Tally()
    cin, side = int(32 * width), 16
    t.conv(3, cin, 3, side)
    for ratio, c, n, s in table:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden, out = cin * ratio, int(c * width)
            t.conv(cin, hidden, 1, side)
            side //= stride
            t.conv(hidden, hidden, 3, side, groups=hidden)
            t.conv(hidden, out, 1, side)
            cin = out
    last = 1280 if width <= 1 else int(1280 * width)
    t.conv(cin, last, 1, side)
    t.head(last, side, classes)
    return t


def _shufflev1_cost(classes: int = 100) -> _Tally:
    t = _Tally()
    t.conv(3, 24, 1, 32)
    cin, side = 24, 32
    for planes, n in ((240, 4), (480, 8), (960, 4)):
        for i in range(n):
            out = planes - cin if i == 0 else planes
            mid = out // 4
            t.conv(cin, mid, 1, side, groups=1 if cin == 24 else 3)
            side //= 2 if i == 0 else 1
            t.conv(mid, mid, 3, side, groups=mid)
            t.conv(mid, out, 1, side, groups=3)
            cin = planes
    t.head(960, side, classes)
    return t


def _shufflev2_cost(widths, repeats, classes: int = 100) -> _Tally:
    t = _Tally()
    t.conv(3, 24, 1, 32)
    cin, side = 24, 32
    for out, n in zip(widths[:3], repeats):
        mid, half = out // 2, side // 2
        t.conv(cin, cin, 3, half, groups=cin)  # left: depthwise stride 2
        t.conv(cin, mid, 1, half)
        t.conv(cin, mid, 1, side)  # right: 1x1 at full size, then depthwise stride 2, 1x1
        t.conv(mid, mid, 3, half, groups=mid)
        t.conv(mid, mid, 1, half)
        side = half
        for _ in range(n):
            t.conv(mid, mid, 1, side)
            t.conv(mid, mid, 3, side, groups=mid)
            t.conv(mid, mid, 1, side)
        cin = out
    t.conv(cin, widths[3], 1, side)
    t.head(widths[3], side, classes)
    return t


@pytest.mark.parametrize(
    "name, tally, mparams, pinned",
    [
        ("MobileNetV2", _mobilenetv2_cost(0.5), 0.81, (812_836, 6_952_064)),
        ("ShuffleV1", _shufflev1_cost(), 0.95, (949_258, 40_444_800)),
        ("ShuffleV2", _shufflev2_cost((116, 232, 464, 1024), (3, 7, 3)), 1.36, (1_355_528, 45_646_976)),
        ("mobilenetv2_w1.4", _mobilenetv2_cost(1.4), 4.47, (4_470_904, 43_395_664)),  # widens the last conv
    ],
)
def test_params_and_flops_match_hand_count(name, tally, mparams, pinned):
    cost = measure(create(name, num_classes=100), (3, 32, 32))
    assert (cost.params, cost.flops) == (tally.params, tally.flops)
    assert round(cost.params / 1e6, 2) == mparams
    assert (cost.params, cost.flops) == pinned  # pinned so a change on both sides at once shows up


# ----------------------------------------------------------------------------------------------
# state_dict keys, from RepDistiller's module definitions
# ----------------------------------------------------------------------------------------------


def _shapes(name: str, classes: int = 100) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in create(name, num_classes=classes).state_dict().items()}


def test_mobilenetv2_keys():
    sd = _shapes("MobileNetV2")
    expected = {
        "conv1.0.weight": (16, 3, 3, 3),  # int(32 * 0.5)
        "conv1.1.running_mean": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),  # t = 1 for the first block
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
        "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1),  # 8 * t=6
        "blocks.3.3.conv.7.num_batches_tracked": (),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "conv2.0.weight": (1280, 160, 1, 1),  # 1280 kept below width 1
        "conv2.1.bias": (1280,),
        "classifier.0.weight": (100, 1280),
        "classifier.0.bias": (100,),
    }
    assert {k: sd.get(k) for k in expected} == expected
    # conv1 (1 conv + 5 BN entries) + 17 blocks of 3 conv/BN pairs + conv2 + linear
    assert len(sd) == 6 + 17 * 3 * 6 + 6 + 2
    assert "blocks.6.1.conv.0.weight" not in sd


def test_shufflev1_keys():
    sd = _shapes("ShuffleV1")
    expected = {
        "conv1.weight": (24, 3, 1, 1),
        "bn1.weight": (24,),
        "layer1.0.conv1.weight": (54, 24, 1, 1),  # (240 - 24) / 4, ungrouped after the stem
        "layer1.0.conv2.weight": (54, 1, 3, 3),
        "layer1.0.conv3.weight": (216, 18, 1, 1),  # 3 groups
        "layer1.1.conv1.weight": (60, 80, 1, 1),
        "layer2.0.conv3.weight": (240, 20, 1, 1),
        "layer2.7.bn3.running_var": (480,),
        "layer3.3.bn3.weight": (960,),
        "linear.weight": (100, 960),
    }
    assert {k: sd.get(k) for k in expected} == expected
    assert not any(k.startswith(("layer1.4.", "layer2.8.", "layer3.4.")) for k in sd)
    assert not any("shortcut" in k for k in sd)  # the pooled shortcut holds no parameters


def test_shufflev2_keys():
    sd = _shapes("ShuffleV2")
    expected = {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (24, 1, 3, 3),  # DownBlock: depthwise on the input
        "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.0.conv3.weight": (58, 24, 1, 1),
        "layer1.0.conv4.weight": (58, 1, 3, 3),
        "layer1.0.bn5.weight": (58,),
        "layer1.3.conv1.weight": (58, 58, 1, 1),  # BasicBlock on half the channels
        "layer2.7.conv3.weight": (116, 116, 1, 1),
        "layer3.0.conv1.weight": (232, 1, 3, 3),
        "layer3.3.bn3.running_mean": (232,),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.weight": (1024,),
        "linear.weight": (100, 1024),
    }
    assert {k: sd.get(k) for k in expected} == expected
    assert not any(k.startswith(("layer1.4.", "layer2.8.", "layer3.4.")) for k in sd)


@pytest.mark.parametrize(
    "alias, twins",
    [
        ("MobileNetV2", ("mobilenetv2_w0.5", "mobile_half", "mobilenetv2_w0.50")),
        ("ShuffleV2", ("shufflev2_w1", "shufflev2_w1.0")),
    ],
)
def test_alias_and_systematic_twin_have_identical_keys(alias, twins):
    reference = _shapes(alias)
    for twin in twins:
        assert _shapes(twin) == reference


def test_alias_loads_twin_state_dict_exactly():
    torch.manual_seed(0)
    source = create("mobilenetv2_w0.5", num_classes=10)
    target = create("MobileNetV2", num_classes=10)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_width_pattern_builds_any_multiplier_and_rejects_empty_stages():
    model = create("mobilenetv2_w0.6", num_classes=10)
    assert model.conv1[0].out_channels == int(32 * 0.6)
    assert resolve("mobilenetv2_w0.6").searchable is False  # off-grid members are not searched
    with pytest.raises(UserError, match="no channels"):
        create("mobilenetv2_w0.01")


def test_shufflev2_unknown_size_is_a_user_error():
    with pytest.raises(UserError, match="shufflev2_w0.5, shufflev2_w1, shufflev2_w1.5, shufflev2_w2"):
        resolve("shufflev2_w3")


# ----------------------------------------------------------------------------------------------
# Feature taps
# ----------------------------------------------------------------------------------------------


def _check_taps(model: nn.Module, shape: tuple[int, int, int]):
    model.eval()
    taps = FeatureTaps(model, shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        plain = model(x)
        out = taps(x)
    assert torch.equal(out.logits, plain)
    sides = [f.shape[-1] for f in out.features]
    assert all(a > b for a, b in zip(sides, sides[1:])), sides
    linear = dict(model.named_modules())[taps.classifier_name]
    assert isinstance(linear, nn.Linear)
    assert out.embedding.shape == (2, linear.in_features)
    return taps, out


def test_mobilenetv2_taps_match_repdistiller_features():
    torch.manual_seed(0)
    model = create("MobileNetV2", num_classes=100)
    _, out = _check_taps(model, (3, 32, 32))
    # RepDistiller's forward(is_feat=True): f0 = conv1, f1..f4 = blocks 1, 2, 4, 6, f5 = pooled conv2
    assert tuple(out.stem.shape) == (2, 16, 16, 16)
    assert [tuple(f.shape[1:]) for f in out.features] == [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)]
    # recompute step by step: a tapped map must be what the next block consumed (no in-place edits)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        tapped = FeatureTaps(model)(x)
        h = model.conv1(x)
        assert torch.equal(tapped.stem, h)
        expected = []
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i in (1, 2, 4, 6):
                expected.append(h)
        for got, want in zip(tapped.features, expected):
            assert torch.equal(got, want)
        assert torch.allclose(tapped.embedding, model.conv2(h).mean((2, 3)))


@pytest.mark.parametrize("name", ["ShuffleV1", "ShuffleV2"])
def test_shufflenet_taps_match_repdistiller_features(name):
    torch.manual_seed(0)
    model = create(name, num_classes=100)
    taps, out = _check_taps(model, (3, 32, 32))
    assert tuple(out.stem.shape) == (2, 24, 32, 32)
    assert [f.shape[-1] for f in out.features] == [16, 8, 4]
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        tapped = taps(x)
        h = torch.relu(model.bn1(model.conv1(x)))
        assert torch.equal(tapped.stem, h)
        for got, layer in zip(tapped.features, (model.layer1, model.layer2, model.layer3)):
            h = layer(h)
            assert torch.equal(got, h)


@pytest.mark.parametrize("name, shape, pooled", [("osakd_cnn5", (3, 32, 32), (16, 5)), ("osakd_fmnist_cnn", (1, 28, 28), (50, 4))])
def test_osakd_cnns_are_the_lenets_at_native_size(name, shape, pooled):
    model = create(name, num_classes=10, in_chans=shape[0])
    _, out = _check_taps(model, shape)
    channels, side = pooled
    assert tuple(out.features[-1].shape[1:]) == (channels, side, side)  # the adaptive grid is the identity
    # LeNet-5: 456 + 2416 + 48120 + 10164 + 850; Caffe LeNet: 520 + 25050 + 400500 + 5010
    assert sum(p.numel() for p in model.parameters()) == {"osakd_cnn5": 62_006, "osakd_fmnist_cnn": 431_080}[name]
    assert out.embedding.shape[1] == {"osakd_cnn5": 84, "osakd_fmnist_cnn": 500}[name]


def test_osakd_cnn_runs_on_digits_sized_inputs():
    model = create("osakd_cnn5", num_classes=10, in_chans=1)
    taps, out = _check_taps(model, (1, 8, 8))
    assert [tuple(f.shape[-2:]) for f in out.features] == [(6, 6), (1, 1)]


# ----------------------------------------------------------------------------------------------
# torchvision prefix
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5", "efficientnet_b0"])
def test_torchvision_models_run_at_8x8_with_any_channels(arch):
    model = create(f"tv:{arch}", num_classes=10, in_chans=1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert _forward(model, (1, 8, 8)).shape == (2, 10)
    assert model.kd_arch == f"tv:{arch}"


@pytest.mark.parametrize("arch, classifier", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_torchvision_classifier_sized_by_constructor(arch, classifier):
    model = create(f"tv:{arch}", num_classes=13)
    assert dict(model.named_modules())[classifier].out_features == 13


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_taps_found_by_dry_run(arch):
    torch.manual_seed(0)
    model = create(f"tv:{arch}", num_classes=10)
    assert getattr(model, "stage_names", None) is None  # nothing declared: found by the dry run
    taps, out = _check_taps(model, (3, 32, 32))
    assert len(out.features) >= 3
    channels = [f.shape[1] for f in out.features]
    assert channels == sorted(channels)  # deeper stages never get narrower in these two


def test_unknown_torchvision_name_suggests_close_matches():
    with pytest.raises(UserError, match="tv:mobilenet_v3_small"):
        create("tv:mobilenetv3_small")


def test_torchvision_never_downloads_weights():
    with pytest.raises(UserError, match="never downloaded"):
        create("tv:resnet18", weights="DEFAULT")


def test_torchvision_too_small_input_names_the_minimum():
    model = create("tv:squeezenet1_1", num_classes=10, in_chans=1)
    with pytest.raises(UserError, match="at least 17x17"):
        _forward(model, (1, 8, 8))
    assert _forward(model, (1, 17, 17)).shape == (2, 10)
    pickle.dumps(model)  # the size check is a picklable hook, not a closure
