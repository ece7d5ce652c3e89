"""Feature taps on zoo and foreign models, stage discovery, and the fvcore cost convention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from compressor.cost import measure, measure_arch
from compressor.features import FeatureTaps, discover_stages
from compressor.models import create


def test_zoo_taps_match_plain_forward_and_layout():
    model = create("resnet20", num_classes=100).eval()
    taps = FeatureTaps(model, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    out = taps(x)
    assert torch.equal(out.logits, model(x))
    assert [tuple(f.shape[1:]) for f in out.features] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert out.embedding.shape == (2, 64) and out.stem.shape == (2, 16, 32, 32)
    layout = taps.layout()
    assert layout.stage_channels == [16, 32, 64] and layout.embedding_dim == 64 and layout.num_classes == 100
    # the classifier really is fed the embedding
    assert torch.allclose(model.fc(out.embedding), out.logits, atol=1e-6)
    taps.remove()
    assert not model._forward_hooks and not model.fc._forward_pre_hooks


def test_layout_needs_no_training_pass_and_keeps_mode_and_stats():
    model = create("resnet8", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FeatureTaps(model, (3, 16, 16)).layout()
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchvision_stages_found_by_dry_run():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    stages, classifier = discover_stages(model, (3, 64, 64))
    assert stages == ["relu", "layer1", "layer2", "layer3", "layer4"] and classifier == "fc"
    taps = FeatureTaps(model, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    out = taps(x)
    assert torch.equal(out.logits, model(x))
    assert out.embedding.shape == (2, 512)


def test_squeeze_excite_pooling_is_not_a_stage():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    stages, classifier = discover_stages(model, (3, 64, 64))
    assert classifier == "classifier.0"
    sizes = [s.height for s in FeatureTaps(model, (3, 64, 64)).layout().stages]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes) and min(sizes) > 1
    assert stages[-1] == "features"


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_user_model_without_declarations():
    taps = FeatureTaps(_Plain(), (1, 8, 8))
    layout = taps.layout()
    assert [(s.channels, s.height) for s in layout.stages] == [(4, 8), (8, 4)]
    assert layout.embedding_dim == 8 and taps.classifier_name == "head"


def test_cost_convention_and_uncounted_ops_reported():
    cost = measure(create("resnet20", num_classes=100), (3, 32, 32))
    assert round(cost.flops / 1e6, 1) == 41.2 and round(cost.params / 1e6, 3) == 0.278
    assert cost.uncounted.get("aten::add", 0) == 9  # the residual adds: reported, not dropped silently


def test_measure_arch_disk_cache(tmp_path, monkeypatch):
    import json

    from compressor import cost as cost_module

    monkeypatch.setenv("KDCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_module._DiskCache, "_instances", {})
    measure_arch.cache_clear()
    first = measure_arch("resnet8", 10, (1, 8, 8))
    path = tmp_path / "cost-cache.json"
    data = json.loads(path.read_text())
    assert len(data) == 1
    (key,) = data
    data[key]["flops"] = 123  # a second process must read the figure from disk, not re-measure
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cost_module._DiskCache, "_instances", {})
    measure_arch.cache_clear()
    assert measure_arch("resnet8", 10, (1, 8, 8)).flops == 123 != first.flops
    measure_arch.cache_clear()


def test_a_one_by_one_last_stage_is_kept_and_the_global_pool_is_not():
    # at 32x32, ResNet-18's layer4 is 1x1: still a stage; its avgpool (also 1x1) is not
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    stages, classifier = discover_stages(model, (3, 32, 32))
    assert stages[-1] == "layer4" and "avgpool" not in stages and classifier == "fc"
