"""CIFAR zoo, part A: ResNet, WRN, VGG, ResNet50 keep RepDistiller's keys, costs and features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressor.cost import measure
from compressor.errors import UserError
from compressor.features import FeatureTaps
from compressor.models import aliases_of, canonical_name, create, list_models, resolve

FAMILIES = ("resnet_cifar", "wrn", "vgg", "resnet_v2_cifar")
ALL_NAMES = [n for f in FAMILIES for n in list_models(f)]

# RepDistiller's model_dict, less the mobile/shuffle nets (zoo part B)
BENCHMARKS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
]  # fmt: skip


def test_every_benchmark_name_is_registered():
    assert set(BENCHMARKS) <= set(ALL_NAMES)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-2 forwards of small models are all per-op overhead; a second intra-op thread only
    adds synchronisation (on a busy 2-core machine it multiplied this file's CPU time ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shape_at_digits_and_cifar_sizes(name):
    with torch.no_grad():
        small = create(name, num_classes=10, in_chans=1).eval()
        assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        big = create(name, num_classes=100, in_chans=3).eval()
        assert big(torch.randn(2, 3, 32, 32)).shape == (2, 100)


# published figures (fvcore convention: 1 FLOP = 1 fused multiply-add), 3x32x32, 100 classes
@pytest.mark.parametrize(
    "name, mparams, mflops, digits",
    [
        ("resnet20", 0.278, 41.2, 3),
        ("resnet110", 1.737, 255.3, 3),
        ("resnet32x4", 7.43, 1085.6, 2),
        ("wrn_40_2", 2.255, 329.0, 3),
    ],
)
def test_cost_matches_published_figures(name, mparams, mflops, digits):
    cost = measure(create(name, num_classes=100), (3, 32, 32))
    assert round(cost.params / 1e6, digits) == mparams
    assert round(cost.flops / 1e6, 1) == mflops


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# key counts derived from RepDistiller's models/*.py: a BN holds 5 keys (weight, bias,
# running_mean, running_var, num_batches_tracked), a bias-free conv 1, a Linear 2.
#   resnet20: stem 6 + 9 blocks x 12 + 2 downsamples x 6 + fc 2 = 128
#   resnet8x4: stem 6 + 3 blocks x (12 + 6), layer1 too since 32 != 64 + fc 2 = 62
#   wrn_40_2: conv1 1 + 18 blocks x 12 + 3 convShortcut + bn1 5 + fc 2 = 227
#   vgg13: 10 x (conv 2 + BN 5) + classifier 2 = 72
#   ResNet50: stem 6 + 16 bottlenecks x 18 + 4 shortcuts x 6 + linear 2 = 320
KEYS = {
    "resnet20": (
        128,
        {
            "conv1.weight": (16, 3, 3, 3),
            "bn1.running_var": (16,),
            "layer1.2.conv2.weight": (16, 16, 3, 3),
            "layer2.0.downsample.0.weight": (32, 16, 1, 1),
            "layer2.0.downsample.1.num_batches_tracked": (),
            "layer3.2.bn2.weight": (64,),
            "fc.weight": (100, 64),
            "fc.bias": (100,),
        },
        ["layer1.0.downsample.0.weight", "layer2.1.downsample.0.weight", "layer3.3.conv1.weight", "linear.weight"],
    ),
    "resnet8x4": (
        62,
        {
            "conv1.weight": (32, 3, 3, 3),
            "layer1.0.downsample.0.weight": (64, 32, 1, 1),
            "layer3.0.conv2.weight": (256, 256, 3, 3),
            "fc.weight": (100, 256),
        },
        ["layer1.1.conv1.weight"],
    ),
    "wrn_40_2": (
        227,
        {
            "conv1.weight": (16, 3, 3, 3),
            "block1.layer.0.bn1.weight": (16,),
            "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
            "block2.layer.0.convShortcut.weight": (64, 32, 1, 1),
            "block3.layer.5.conv2.weight": (128, 128, 3, 3),
            "bn1.running_mean": (128,),
            "fc.weight": (100, 128),
        },
        ["block1.layer.1.convShortcut.weight", "block3.layer.6.conv1.weight", "bn2.weight"],
    ),
    "vgg13": (
        72,
        {
            "block0.0.weight": (64, 3, 3, 3),
            "block0.0.bias": (64,),
            "block0.1.running_mean": (64,),
            "block0.3.weight": (64, 64, 3, 3),
            "block0.4.weight": (64,),
            "block4.4.num_batches_tracked": (),
            "classifier.weight": (100, 512),
        },
        ["block0.5.weight", "block0.6.weight", "fc.weight"],
    ),
    "ResNet50": (
        320,
        {
            "conv1.weight": (64, 3, 3, 3),
            "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
            "layer1.0.shortcut.1.running_var": (256,),
            "layer2.0.conv2.weight": (128, 128, 3, 3),
            "layer4.2.conv3.weight": (2048, 512, 1, 1),
            "linear.weight": (100, 2048),
        },
        ["layer1.1.shortcut.0.weight", "layer4.3.conv1.weight", "fc.weight"],
    ),
}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_state_dict_keys_match_repdistiller(name):
    count, present, absent = KEYS[name]
    shapes = _shapes(create(name, num_classes=100))
    assert len(shapes) == count
    for key, shape in present.items():
        assert shapes.get(key) == shape, key
    assert not set(absent) & set(shapes)
    # parameter-free modules (ReLU, pooling) never add keys
    assert not any(".relu" in k or "pool" in k for k in shapes)


ALIASES = [n for n in ALL_NAMES if canonical_name(n) != n]


def test_benchmark_aliases_point_at_systematic_names():
    assert canonical_name("resnet20") == "resnet_d20_w1"
    assert canonical_name("resnet8x4") == "resnet_d8_w4_s32"
    assert canonical_name("resnet32x4") == "resnet_d32_w4_s32"
    assert canonical_name("vgg13") == "vgg13_w1"
    assert aliases_of("resnet_d110_w1") == ["resnet110"]
    assert len(ALIASES) == 9 + 5


@pytest.mark.parametrize("alias", ALIASES)
def test_alias_has_the_same_keys_as_its_twin(alias):
    assert _shapes(create(alias)) == _shapes(create(canonical_name(alias)))


def test_patterns_build_any_member():
    m = create("resnet_d26_w0.75", num_classes=7)
    assert m.conv1.out_channels == 12 and len(m.layer1) == 4 and m.fc.in_features == 48
    assert create("resnet_d14_w3_s24").conv1.out_channels == 24
    assert create("wrn_10_3").fc.in_features == 192
    assert create("vgg11_w0.125").classifier.in_features == 64
    # a pattern name of a grid member builds the same thing as the grid member
    assert _shapes(create("resnet_d20_w1.0")) == _shapes(create("resnet20"))


def test_search_grid():
    grid = set(list_models("resnet_cifar", searchable_only=True))
    assert {"resnet_d8_w0.5", "resnet_d110_w2", "resnet_d32_w4_s32", "resnet_d8_w4_s32"} <= grid
    assert len(grid) == 8 * 4
    assert {canonical_name(a) for a in ALIASES if a.startswith("resnet")} <= grid
    assert len(list_models("wrn", searchable_only=True)) == 16
    assert len(list_models("vgg", searchable_only=True)) == 15
    assert list_models("resnet_v2_cifar", searchable_only=True) == []


@pytest.mark.parametrize(
    "bad, hint",
    [
        ("resnet21", "resnet20"),
        ("wrn40_2", "wrn_40_2"),
        ("vgg_13", "vgg13"),
        ("resnet_d21_w1", "6n+2"),
        ("wrn_18_2", "6n+4"),
        ("vgg12_w1", "8, 11, 13, 16, 19"),
        ("resnet_d20_w0", "positive"),
    ],
)
def test_unknown_name_is_a_user_error_with_a_hint(bad, hint):
    with pytest.raises(UserError) as info:
        create(bad)
    assert bad in str(info.value) and hint in str(info.value)


# --- feature taps equal RepDistiller's forward(is_feat=True): [f0, f1.., pooled], logits ---


def _reference_features(name, model, x):
    """RepDistiller's forward order, module by module; each stage gets a copy of its input, so a
    later in-place op in the model could not make the taps and the reference agree by accident."""
    if name.startswith("resnet") or name.startswith("ResNet"):
        f = [model.relu(model.bn1(model.conv1(x)))]
        for stage in model.stage_names:
            f.append(getattr(model, stage)(f[-1].clone()))
    elif name.startswith("wrn"):
        f = [model.conv1(x)]
        for stage in model.stage_names:
            f.append(getattr(model, stage)(f[-1].clone()))
        pooled = F.relu(model.bn1(f[-1].clone())).mean((2, 3))
        return f, pooled
    else:  # vgg at 32x32: pool after blocks 0-2, none after block 3
        f = [F.relu(model.block0(x))]
        for i in range(1, 5):
            h = f[-1].clone()
            h = F.max_pool2d(h, 2) if i <= 3 else h
            f.append(F.relu(getattr(model, f"block{i}")(h)))
    return f, f[-1].mean((2, 3))


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "wrn_16_2", "vgg8", "ResNet18"])
def test_taps_equal_repdistiller_features(name):
    torch.manual_seed(0)
    model = create(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = FeatureTaps(model)(x)
        f, pooled = _reference_features(name, model, x)
        logits = model(x)
    torch.testing.assert_close(out.stem, f[0])
    assert len(out.features) == len(f) - 1
    for tap, ref in zip(out.features, f[1:]):
        torch.testing.assert_close(tap, ref)
    torch.testing.assert_close(out.embedding, pooled)
    torch.testing.assert_close(out.logits, logits)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1", "vgg8", "ResNet18"])
def test_stem_module_runs_once_per_forward(name):
    model = create(name, num_classes=10).eval()
    stem = dict(model.named_modules())[model.stem_name]
    calls = []
    stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1


def test_resnet20_tap_layout():
    model = create("resnet20", num_classes=100).eval()
    taps = FeatureTaps(model)
    layout = taps.layout((3, 32, 32))
    assert layout.stage_channels == [16, 32, 64]
    assert [(s.height, s.width) for s in layout.stages] == [(32, 32), (16, 16), (8, 8)]
    assert layout.stem.channels == 16 and layout.embedding_dim == 64 and layout.num_classes == 100
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(taps(x).logits, model(x))
    # digits: the same taps at 8x8
    assert [s.height for s in FeatureTaps(create("resnet20", in_chans=1)).layout((1, 8, 8)).stages] == [8, 4, 2]


def test_vgg_pools_adapt_to_input_size():
    model = create("vgg8", num_classes=10, in_chans=1).eval()
    sizes = lambda hw: [s.height for s in FeatureTaps(model).layout((1, hw, hw)).stages]  # noqa: E731
    assert sizes(4) == [2, 1, 1, 1]  # pools skipped once the map is 1x1
    assert sizes(32) == [16, 8, 4, 4]  # RepDistiller at 32x32: no pool3
    assert sizes(64) == [32, 16, 8, 4]  # and at 64x64 (Tiny ImageNet): pool3 runs


def test_resolve_reports_family_and_kwargs():
    entry = resolve("resnet32x4")
    assert entry.family == "resnet_cifar" and entry.kwargs == {"depth": 32, "width": 4.0, "stem": 32}
    assert create("wrn_16_1", drop_rate=0.3).block1.layer[0].drop_rate == 0.3
