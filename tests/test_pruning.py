"""Issue 14: structured pruning to a budget (Torch-Pruning), and pruned checkpoints that rebuild safely."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compressor.checkpoint import ModelMeta, load_model, save_model
from compressor.cost import measure
from compressor.errors import UserError
from compressor.models import create
from compressor.pruning import RATIO_TOLERANCE, PruneSettings, _Collapse, _trial, prune_to_budget

SHAPE = (3, 32, 32)


def _teacher(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return create(arch, num_classes=10, in_chans=3).eval()


def _save(path, result, arch: str) -> None:
    meta = ModelMeta(arch=arch, num_classes=10, in_chans=3, input_size=SHAPE[1:], pruning=result.record)
    save_model(path, result.model, meta)


def _channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("arch", ["resnet20", "MobileNetV2"])
def test_half_the_flops_fits_is_the_largest_that_fits_and_reloads_identically(tmp_path, arch):
    teacher = _teacher(arch)
    before = _channels(teacher)
    budget = measure(teacher, SHAPE).flops / 2
    result = prune_to_budget(teacher, SHAPE, max_flops=budget)

    assert result.cost.flops <= budget
    assert measure(result.model, SHAPE).flops == result.cost.flops
    # the ratio is solved: a tolerance step less pruning no longer fits
    weaker, _ = _trial(teacher, result.ratio - RATIO_TOLERANCE, SHAPE, PruneSettings(), None, arch)
    assert measure(weaker, SHAPE).flops > budget
    after = _channels(result.model)
    assert any(after[n] < before[n] for n in before), "nothing was pruned"
    assert all(c % 8 == 0 for n, c in after.items() if after[n] != before[n])
    assert result.model(torch.zeros(1, *SHAPE)).shape == (1, 10)  # the classifier keeps every class
    assert _channels(teacher) == before  # the teacher itself is untouched

    path = tmp_path / "pruned.pt"
    _save(path, result, arch)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["pruning"]["history"] == result.history and result.history
    loaded = load_model(path)
    assert _channels(loaded.model) == after
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), result.model.eval()(x))


def test_a_params_budget_is_solved_too():
    teacher = _teacher("resnet20")
    limit = measure(teacher, SHAPE).params * 0.3
    result = prune_to_budget(teacher, SHAPE, max_params=limit)
    assert result.cost.params <= limit < measure(teacher, SHAPE).params


def test_pruning_a_pruned_model_keeps_both_histories(tmp_path):
    teacher = _teacher("resnet20")
    flops = measure(teacher, SHAPE).flops
    first = prune_to_budget(teacher, SHAPE, max_flops=flops * 0.6)
    second = prune_to_budget(first.model, SHAPE, max_flops=first.cost.flops * 0.6)
    assert second.history[: len(first.history)] == first.history and len(second.history) > len(first.history)
    _save(tmp_path / "p.pt", second, "resnet20")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "p.pt").model(x), second.model(x))


def test_unreachable_budget_says_pruning_would_remove_a_whole_layer():
    teacher = _teacher("resnet20")
    with pytest.raises(UserError, match=r"cannot reach 0.001 MFLOPs: .* every prunable layer is down to 8 "
                                        r"channels .*removing whole layers or stages"):
        prune_to_budget(teacher, SHAPE, max_flops=1000)


def test_a_layer_never_goes_below_round_to_and_an_emptied_one_is_a_collapse():
    # layer scope: ratio 0.97 would leave int(16 * 0.03) = 0 channels; the cap keeps 8 in every group
    pruned, _ = _trial(_teacher("resnet20"), 0.97, SHAPE, PruneSettings(), None, "resnet20")
    assert set(_channels(pruned).values()) == {8}
    # global scope ranks all channels together and can empty a group; Torch-Pruning would then silently
    # leave it whole (cost jumps back up), so the trial says which group collapsed instead
    with pytest.raises(_Collapse) as err:
        _trial(_teacher("resnet20"), 0.97, SHAPE, PruneSettings(scope="global"), None, "resnet20")
    assert err.value.layers and all(name.startswith(("conv1", "layer")) for name in err.value.layers)


class _HardCodedView(nn.Module):
    """Flattens with a fixed size: after pruning conv2 the reshape no longer fits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=4, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.reshape(-1, 16 * 8 * 8))


def test_a_graph_torch_pruning_cannot_follow_names_the_layer():
    with pytest.raises(UserError, match=r"cannot prune _HardCodedView: .*fails at or after layer conv2"):
        prune_to_budget(_HardCodedView().eval(), SHAPE, max_flops=measure(_HardCodedView(), SHAPE).flops / 2)


def test_settings_are_parsed_once_and_taylor_needs_data():
    assert PruneSettings.parse() == PruneSettings("l1", "layer", 8)
    assert PruneSettings.parse("L2", "Global", 4) == PruneSettings("l2", "global", 4)
    with pytest.raises(UserError, match="unknown pruning importance 'l3'; known: l1, l2"):
        PruneSettings.parse("l3")
    with pytest.raises(UserError, match="unknown pruning scope"):
        PruneSettings.parse(scope="stage")
    with pytest.raises(UserError, match="'taylor' needs a labelled calibration batch"):
        prune_to_budget(_teacher("resnet8"), SHAPE, max_flops=1e6, settings=PruneSettings.parse("taylor"))


def test_taylor_and_global_scope_meet_the_budget():
    teacher = _teacher("resnet8")
    budget = measure(teacher, SHAPE).flops * 0.5
    batch = (torch.randn(8, *SHAPE), torch.randint(0, 10, (8,)))
    for settings in (PruneSettings.parse("taylor"), PruneSettings.parse("l1", "global")):
        result = prune_to_budget(teacher, SHAPE, max_flops=budget, settings=settings, calibration=batch)
        assert result.cost.flops <= budget and result.record["importance"] == settings.importance


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pruned") / "resnet20_pruned.pt"
    teacher = _teacher("resnet20")
    result = prune_to_budget(teacher, SHAPE, max_flops=measure(teacher, SHAPE).flops / 2)
    _save(path, result, "resnet20")
    return path, result


def _edit_history(src, dst, edit) -> None:
    raw = torch.load(src, weights_only=True)
    edit(raw["meta"]["pruning"])
    torch.save(raw, dst)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["history"][0].__setitem__(0, "layer9.0.conv1"), "prunes layer 'layer9.0.conv1', which resnet20 does not have"),
    (lambda p: p["history"][0].__setitem__(2, [999]), "does not fit the architecture: step 1 removes output channels 999 of"),
    (lambda p: p["history"].pop(), "pruned by its recorded history: wrong shape"),
    (lambda p: p.pop("history"), "history record is missing or malformed"),
])
def test_a_history_that_does_not_fit_its_arch_is_one_line_exit_2(tmp_path, cli, pruned_file, edit, message):
    path = tmp_path / "edited.pt"
    _edit_history(pruned_file[0], path, edit)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_model(path)
    result = cli("flops", str(path))
    assert result.exit_code == 2 and message in result.output and result.output.strip().count("\n") == 0


def test_flops_and_export_work_on_a_pruned_checkpoint(tmp_path, cli, pruned_file):
    path, result = pruned_file
    shown = cli("flops", str(path))
    assert shown.exit_code == 0 and f"{result.cost.flops / 1e6:.1f} MFLOPs" in shown.output
    onnx = tmp_path / "pruned.onnx"
    exported = cli("export", str(path), "-o", str(onnx))
    assert exported.exit_code == 0, exported.output
    import onnxruntime as ort

    x = torch.randn(2, *SHAPE)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), result.model(x), atol=1e-4)
    timed = cli("bench", str(onnx), "--batch", "1", "--threads", "1", "--runs", "2", "--min-time", "0",
                "--warmup", "0", "--device", "cpu")  # the ONNX file records the pruned checkpoint: eager too
    assert timed.exit_code == 0 and "torch" in timed.output.lower() and "no eager" not in timed.output, timed.output
