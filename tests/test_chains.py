"""DGKD (densely guided, stochastic teacher drop) and the teacher-class network (flat, hierarchical)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.knowledge.hinton import soft_kl
from compressor.models import create
from compressor.schemes import SchemeRequest, build_scheme
from compressor.schemes.dgkd import DGKD, check_drop_rate, sample_dropped
from compressor.schemes.offline import Offline

SHAPE = (1, 8, 8)
TINY = "resnet_d8_w0.5"  # 0.2 MFLOPs at 1x8x8: the tests' student and assistants


def tiny(arch: str = TINY, classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create(arch, num_classes=classes, in_chans=1)


def batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------- DGKD: the stochastic drop


@pytest.mark.parametrize("n,rate", [(4, 0.25), (4, 0.3), (3, 0.5), (2, 0.5), (5, 0.1)])
def test_drop_samples_the_stated_fraction_and_always_keeps_one(n, rate):
    torch.manual_seed(0)
    draws = [sample_dropped(n, rate) for _ in range(4000)]
    per_teacher = [sum(d[i] for d in draws) / len(draws) for i in range(n)]
    overall = sum(per_teacher) / n
    assert abs(overall - rate) < 0.01, overall
    # uniform over teachers, the teacher itself (index 0) included, as in the official code
    assert all(abs(f - rate) < 0.035 for f in per_teacher), per_teacher
    assert all(not all(d) for d in draws)
    counts = {sum(d) for d in draws}
    assert counts <= {math.floor(rate * n), math.ceil(rate * n)}


def test_default_drop_is_exactly_one_teacher_per_batch_and_a_lone_teacher_is_never_dropped():
    torch.manual_seed(1)
    draws = [sample_dropped(3, None) for _ in range(600)]
    assert all(sum(d) == 1 for d in draws)
    assert all(abs(sum(d[i] for d in draws) / 600 - 1 / 3) < 0.06 for i in range(3))
    assert all(sample_dropped(1, None) == [False] for _ in range(20))
    assert all(sample_dropped(1, 0.9) == [False] for _ in range(20))
    # above (n-1)/n the count is capped: one teacher always stays
    assert all(sum(sample_dropped(2, 0.9)) == 1 for _ in range(50))


def test_drops_follow_the_global_seed():
    torch.manual_seed(7)
    first = [sample_dropped(4, 0.4) for _ in range(50)]
    torch.manual_seed(7)
    assert [sample_dropped(4, 0.4) for _ in range(50)] == first


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half", float("nan")])
def test_bad_drop_rate_is_a_user_error(bad):
    with pytest.raises(UserError, match="drop rate"):
        check_drop_rate(bad)
    assert check_drop_rate(None) is None and check_drop_rate("0.5") == 0.5


# ---------------------------------------------------------------- DGKD: the loss


def test_dgkd_with_one_teacher_and_no_drop_is_offline_distillation():
    teacher, student_a, student_b = tiny("resnet8", seed=1), tiny(seed=2), tiny(seed=2)
    common = dict(input_shape=SHAPE, num_classes=10, num_train=100, ce_weight=0.1)
    dgkd = DGKD([teacher], student_a, [("hinton", 0.9)], drop_rate=0.0, **common)
    offline = Offline(teacher, student_b, [("hinton", 0.9)], **common)
    b = batch()
    ours, theirs = dgkd(b), offline(b)
    assert set(ours) == {"ce", "hinton@teacher"}
    assert torch.allclose(ours["ce"], theirs["ce"]) and torch.allclose(ours["hinton@teacher"], theirs["hinton"])


def test_kept_teachers_terms_are_summed_unnormalised_and_dropped_ones_are_zero_and_not_run():
    teachers = [tiny("resnet14", seed=1), tiny("resnet8", seed=3), tiny(seed=4)]
    student = tiny(seed=5)
    scheme = DGKD(teachers, student, [("hinton", 0.9)], input_shape=SHAPE, num_classes=10, num_train=100,
                  drop_rate=1 / 3)
    calls = [count_forwards(t) for t in teachers]  # after the layout dry runs
    b = batch(seed=3)
    scheme.eval()  # BN on running statistics, so the hand computation below sees the same numbers
    torch.manual_seed(11)
    terms = scheme(b)
    dropped, runs = scheme.last_dropped, [c[0] for c in calls]
    assert sum(dropped) == 1 and list(terms) == ["ce", "hinton@teacher", "hinton@ta1", "hinton@ta2"]
    assert runs == [0 if d else 1 for d in dropped]  # a dropped teacher is not even run
    with torch.no_grad():
        s = student(b.x)
        expected = [0.0 if d else 0.9 * 16 * soft_kl(s, t(b.x), 4.0).item() for t, d in zip(teachers, dropped)]
    got = [terms[f"hinton@{n}"].item() for n in ("teacher", "ta1", "ta2")]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    total = sum(terms.values()).item()
    assert total == pytest.approx(terms["ce"].item() + sum(expected), rel=1e-5)


def test_dgkd_builder_takes_teachers_from_the_request_and_trains_only_the_student():
    teacher, ta = tiny("resnet14", seed=1), tiny("resnet8", seed=2)
    request = SchemeRequest(TINY, 10, SHAPE, 100, teacher=teacher, method="hinton", teachers=[ta],
                            options={"drop_rate": 0.5, "teacher_names": ["T", "TA"]})
    scheme = build_scheme("dgkd", request)
    assert list(scheme.teachers) == [teacher, ta] and scheme.teacher_names == ["T", "TA"]
    trainable = {id(p) for p in scheme.trainable_parameters()}
    assert trainable == {id(p) for p in scheme.student.parameters()}
    assert scheme.deployable() is scheme.student and scheme.frozen_modules() == [teacher, ta]
    with pytest.raises(UserError, match="teacher"):
        build_scheme("dgkd", SchemeRequest(TINY, 10, SHAPE, 100))
    with pytest.raises(UserError, match="drop rate"):
        build_scheme("dgkd", SchemeRequest(TINY, 10, SHAPE, 100, teacher=teacher, options={"drop_rate": 1}))


def test_dgkd_each_teacher_gets_its_own_learnable_loss_parts():
    teachers = [tiny("resnet14", seed=1), tiny("resnet_d8_w2", seed=2)]
    scheme = DGKD(teachers, tiny(), [("fitnet", 100.0)], input_shape=SHAPE, num_classes=10, num_train=100)
    first, second = (sum(p.numel() for p in losses.parameters()) for losses in scheme.losses)
    assert first > 0 and second > first  # the wider teacher needs a wider regressor
    assert scheme.has_unused_parameters  # a dropped teacher's regressor idles that step


def test_dgkd_student_learns_from_the_teachers():
    teachers = [tiny("resnet8", seed=1), tiny(seed=2)]
    scheme = DGKD(teachers, tiny(seed=3), [("hinton", 1.0)], input_shape=SHAPE, num_classes=10, num_train=100,
                  ce_weight=0.0, drop_rate=0.0)
    opt = torch.optim.Adam(scheme.trainable_parameters(), lr=3e-3)
    b = batch(16, seed=4)
    scheme.train()
    first = None
    for _ in range(25):
        loss = sum(scheme(b).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---------------------------------------------------------------- TCN: chunks


@pytest.mark.parametrize("dim,n", [(64, 1), (64, 4), (64, 8), (10, 4), (7, 7), (100, 3), (5, 2)])
def test_chunks_cover_the_embedding_exactly_once(dim, n):
    from compressor.models.teacher_class import chunk_bounds, chunk_sizes

    sizes = chunk_sizes(dim, n)
    bounds = chunk_bounds(sizes)
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(dim))  # every dimension once, in order
    assert len(sizes) == n and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first chunks
    assert sum(s > dim // n for s in sizes) == dim % n


@pytest.mark.parametrize("dim,n,msg", [(64, 0, "at least 1"), (64, -2, "at least 1"), (8, 9, "at most 8")])
def test_bad_chunk_counts_are_user_errors(dim, n, msg):
    from compressor.models.teacher_class import chunk_sizes

    with pytest.raises(UserError, match=msg):
        chunk_sizes(dim, n)


def test_tcn_builder_refuses_more_students_than_embedding_dimensions():
    request = SchemeRequest(TINY, 10, SHAPE, 100, teacher=tiny("resnet8"), options={"students": 65})
    with pytest.raises(UserError, match="at most 64"):
        build_scheme("tcn", request)
    with pytest.raises(UserError, match="teacher"):
        build_scheme("tcn", SchemeRequest(TINY, 10, SHAPE, 100, options={"students": 2}))
    with pytest.raises(UserError, match="one tcn stage per level"):
        build_scheme("tcn", SchemeRequest(TINY, 10, SHAPE, 100, teacher=tiny("resnet8"),
                                          options={"students": 4, "hierarchical": True}))


# ---------------------------------------------------------------- TCN: the deployable


def test_ensemble_flops_and_params_are_the_sum_of_its_parts():
    from compressor.cost import count_params, measure

    ensemble = create("tcn4_d64_resnet8", num_classes=10, in_chans=1)
    assert ensemble.chunks == (16, 16, 16, 16)
    whole = measure(ensemble, SHAPE)
    parts = [measure(s, SHAPE) for s in ensemble.students] + [measure(ensemble.output, (64,))]
    assert whole.flops == sum(p.flops for p in parts) > 0
    assert whole.flops == 4 * measure(create("resnet8", num_classes=16, in_chans=1), SHAPE).flops + 64 * 10
    assert whole.params == count_params(ensemble) == sum(p.params for p in parts)


def test_ensemble_exports_to_onnx_as_one_model(tmp_path):
    import numpy as np
    import onnxruntime as ort

    ensemble = create("tcn3_d10_resnet_d8_w0.5", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, *SHAPE)
    path = tmp_path / "tcn.onnx"
    torch.onnx.export(ensemble, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = ensemble(x).numpy()
    assert out.shape == (2, 10) and np.allclose(out, expected, atol=1e-4)


def test_ensemble_checkpoint_rebuilds_from_its_arch_name(tmp_path):
    from compressor.checkpoint import ModelMeta, load_model, save_model

    ensemble = create("tcn2_d64_resnet8", num_classes=10, in_chans=1).eval()
    path = tmp_path / "tcn.pt"
    save_model(path, ensemble, ModelMeta(arch=ensemble.kd_arch, num_classes=10, in_chans=1, input_size=(8, 8)))
    loaded = load_model(path)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ensemble(x))
    assert loaded.meta.arch == "tcn2_d64_resnet8" and loaded.model.chunks == (32, 32)


# ---------------------------------------------------------------- TCN: the scheme


def tcn_scheme(students: int = 4, teacher=None, **options):
    teacher = teacher if teacher is not None else tiny("resnet8", seed=1)
    request = SchemeRequest(TINY, 10, SHAPE, 100, teacher=teacher, options={"students": students, **options})
    return build_scheme("tcn", request)


def test_output_layer_starts_as_the_teachers_classifier():
    teacher = tiny("resnet8", seed=1)
    scheme = tcn_scheme(teacher=teacher)
    assert torch.equal(scheme.ensemble.output.weight, teacher.fc.weight)
    assert torch.equal(scheme.ensemble.output.bias, teacher.fc.bias)
    assert scheme.ensemble.output.weight.data_ptr() != teacher.fc.weight.data_ptr()  # a copy


def test_each_student_regresses_its_chunk_of_the_teacher_embedding():
    teacher = tiny("resnet8", seed=1)
    scheme = tcn_scheme(3, teacher=teacher)  # 64 = 22 + 21 + 21
    scheme.start_epoch(0, 10)
    scheme.eval()
    b = batch(seed=2)
    terms = scheme(b)
    assert list(terms) == ["mse_0", "mse_1", "mse_2"]
    seen = []
    teacher.fc.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        teacher(b.x)
        pooled = seen[-1]  # what the teacher's classifier reads
        for i, (a, z) in enumerate([(0, 22), (22, 43), (43, 64)]):
            want = F.mse_loss(scheme.ensemble.students[i](b.x), pooled[:, a:z])
            assert terms[f"mse_{i}"].item() == pytest.approx(want.item(), rel=1e-5)


def test_phases_switch_objective_and_what_trains():
    scheme = tcn_scheme(2, finetune_epochs=2)
    params = {id(p) for p in scheme.trainable_parameters()}
    assert params == {id(p) for p in scheme.ensemble.parameters()}  # all in the optimiser from the start
    b = batch(seed=3)
    phases = []
    for epoch in range(6):
        scheme.start_epoch(epoch, 6)
        phases.append(scheme.phase)
    assert phases == ["regress"] * 4 + ["finetune"] * 2

    scheme.start_epoch(0, 6)
    scheme.train()
    scheme.zero_grad()
    sum(scheme(b).values()).backward()
    assert scheme.ensemble.output.weight.grad is None
    assert all(p.grad is not None for p in scheme.ensemble.students.parameters())

    scheme.start_epoch(5, 6)
    scheme.train()
    assert not any(m.training for m in scheme.ensemble.students.modules())  # frozen BN statistics
    scheme.zero_grad(set_to_none=True)
    terms = scheme(b)
    assert list(terms) == ["ce"]
    terms["ce"].backward()
    assert scheme.ensemble.output.weight.grad is not None
    assert all(p.grad is None for p in scheme.ensemble.students.parameters())


def test_finetune_settings_are_checked():
    assert tcn_scheme(2).phase_of(6, 7) == "finetune" and tcn_scheme(2).phase_of(5, 7) == "regress"  # round(7/7)=1
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(UserError, match="finetune_epochs must be a whole number"):
            tcn_scheme(2, finetune_epochs=bad)
    with pytest.raises(UserError, match="at least one epoch"):
        tcn_scheme(2, finetune_epochs=3).start_epoch(0, 3)
    with pytest.raises(UserError, match="neither the output layer nor the students"):
        tcn_scheme(2, finetune_output=False, finetune_epochs=1).start_epoch(0, 3)
    frozen_output = tcn_scheme(2, finetune_output=False, finetune_students=True, finetune_epochs=1)
    assert not any(p is frozen_output.ensemble.output.weight for p in frozen_output.trainable_parameters())


def test_students_learn_the_embedding():
    scheme = tcn_scheme(2)
    scheme.start_epoch(0, 10)
    scheme.train()
    opt = torch.optim.Adam(scheme.trainable_parameters(), lr=3e-3)
    b = batch(16, seed=5)
    losses = []
    for _ in range(25):
        loss = sum(scheme(b).values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


# ---------------------------------------------------------------- TCN: hierarchical


def test_levels_of_flat_and_hierarchical_networks():
    from compressor.schemes.tcn import tcn_levels

    assert [(lv.name, lv.students, lv.teacher) for lv in tcn_levels(4)] == [("tcn", 4, "teacher")]
    assert [(lv.name, lv.students, lv.teacher) for lv in tcn_levels(8, hierarchical=True)] == [
        ("tcn1", 1, "teacher"), ("tcn2", 2, "tcn1"), ("tcn4", 4, "tcn2"), ("tcn8", 8, "tcn4")]
    assert [lv.students for lv in tcn_levels(1, hierarchical=True)] == [1]
    with pytest.raises(UserError, match="power of two"):
        tcn_levels(6, hierarchical=True)
    with pytest.raises(UserError, match="at least 1"):
        tcn_levels(0)


def test_a_level_regresses_the_halves_of_the_level_above():
    above = tcn_scheme(2).ensemble.eval()  # level 2: two students, 32 dims each
    below = tcn_scheme(4, teacher=above)  # level 4 learns from level 2's concatenated output
    assert below.ensemble.chunks == (16,) * 4
    assert torch.equal(below.ensemble.output.weight, above.output.weight)  # the level above's output layer
    below.start_epoch(0, 10)
    below.eval()
    b = batch(seed=6)
    terms = below(b)
    with torch.no_grad():
        for i in range(4):
            parent = above.students[i // 2](b.x)[:, (i % 2) * 16:(i % 2 + 1) * 16]
            want = F.mse_loss(below.ensemble.students[i](b.x), parent)
            assert terms[f"mse_{i}"].item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------- through the trainer, on digits


@pytest.fixture(scope="module")
def digits():
    from compressor.data import load_source

    return load_source("digits", val_fraction=0.1, seed=0)


def quick_config(epochs: int, **kw):
    from compressor.trainer import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=128, lr=0.01, optimizer="adam", schedule="constant",
                       weight_decay=0.0, augment=False, progress="off", device="cpu", **kw)


def test_tcn_trains_through_the_trainer_and_logs_both_phases(digits, tmp_path):
    from compressor.trainer import fit

    request = SchemeRequest(TINY, 10, digits.input_shape, digits.split_size("train"),
                            teacher=tiny("resnet8", seed=1), options={"students": 2, "finetune_epochs": 1})
    scheme = build_scheme("tcn", request)
    result = fit(scheme, digits, quick_config(3, select="last"), log_path=tmp_path / "log.jsonl")
    assert [sorted(r["loss_terms"]) for r in result.history] == [["mse_0", "mse_1"]] * 2 + [["ce"]]
    assert result.deployable is scheme.ensemble and result.test is not None
    assert all(r["val_top1"] is not None for r in result.history)


def test_dgkd_resumed_run_repeats_the_uninterrupted_run(digits, tmp_path):
    from compressor.trainer import fit

    def run(epochs: int, resume: bool):
        teachers = [tiny("resnet8", seed=1), tiny("resnet_d8_w1", seed=2)]
        request = SchemeRequest(TINY, 10, digits.input_shape, digits.split_size("train"), teacher=teachers[0],
                                teachers=teachers, options={"drop_rate": 0.5})
        scheme = build_scheme("dgkd", request)
        torch.manual_seed(3)
        scheme.student.load_state_dict(tiny(seed=3).state_dict())
        fit(scheme, digits, quick_config(epochs, select="last"), state_path=tmp_path / "state.pt", resume=resume)
        return scheme.student.state_dict()

    straight = run(2, resume=False)
    (tmp_path / "state.pt").unlink()
    run(1, resume=False)
    resumed = run(2, resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------- the runner: a stage's model as the next one's teacher


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _chain_run(digits, tmp_path, monkeypatch, stage_train=None):
    """teacher -> ta1 (offline) -> student (DGKD from teacher and ta1), one epoch each; returns the
    run and every SchemeRequest the runner built, with the hooks its teachers carried on arrival."""
    from compressor.checkpoint import LoadedModel, ModelMeta
    from recipes import runner
    from recipes.plan import Plan, Stage

    seen = []
    real = runner.build_scheme

    def spy(name, request):
        seen.append((name, request, [hook_count(t) for t in request.teachers]))
        return real(name, request)

    monkeypatch.setattr(runner, "build_scheme", spy)
    teacher = LoadedModel(tiny("resnet8", seed=1).eval(), ModelMeta.from_source("resnet8", digits))
    train = {"epochs": 1, "batch_size": 256, "optimizer": "adam", "lr": 0.01, "schedule": "constant",
             "weight_decay": 0.0, "augment": False, "progress": "off", "device": "cpu", **(stage_train or {})}
    plan = Plan(data="digits", teacher="t.pt", stages=[
        Stage("ta1", "offline", TINY, ["teacher"], "hinton", {}, dict(train)),
        Stage("student", "dgkd", TINY, ["teacher", "ta1"], "hinton", {}, dict(train)),
    ])
    result = runner.run_plan(plan, digits, tmp_path / "run", teacher=teacher, echo=lambda _: None)
    return result, seen


def test_a_stages_model_reaches_the_next_stage_and_the_caller_without_feature_tap_hooks(digits, tmp_path,
                                                                                         monkeypatch):
    result, seen = _chain_run(digits, tmp_path, monkeypatch)
    assert [hooks for _, _, hooks in seen] == [[0], [0, 0]]  # ta1 as a teacher carries no taps
    assert hook_count(result.final.model) == 0  # nor does the final (DGKD) student


def test_strip_taps_leaves_other_hooks_and_works_on_a_deep_copy():
    import copy

    from compressor.features import FeatureTaps, strip_taps

    model = tiny()
    calls = count_forwards(model)  # a user's own hook: not a tap, must survive
    taps = FeatureTaps(model, SHAPE)
    clone = strip_taps(copy.deepcopy(model))
    tapped = len(taps.stage_names) + 1 + (1 if taps.stem_name else 0)  # stages, classifier input, stem
    assert hook_count(clone) == 1 and hook_count(model) == 1 + tapped
    clone(batch().x)
    assert calls == [1]  # the user's hook survived on the copy (deepcopy shares the function)
    out = taps(batch().x)  # the original's taps still fire
    assert len(out.features) == len(taps.stage_names) and calls == [2]


@pytest.mark.parametrize("scheme", ["vanilla", "offline"])
def test_a_plans_train_label_smoothing_reaches_the_schemes_cross_entropy(scheme, digits, tmp_path, monkeypatch):
    from compressor.checkpoint import LoadedModel, ModelMeta
    from recipes import runner
    from recipes.plan import Plan, Stage

    built = []
    real = runner.build_scheme
    monkeypatch.setattr(runner, "build_scheme", lambda name, request: built.append(real(name, request)) or built[-1])
    teacher = LoadedModel(tiny("resnet8", seed=1).eval(), ModelMeta.from_source("resnet8", digits))
    train = {"epochs": 1, "batch_size": 256, "optimizer": "adam", "lr": 0.01, "schedule": "constant",
             "augment": False, "progress": "off", "device": "cpu", "label_smoothing": 0.3}
    teachers = ["teacher"] if scheme == "offline" else []
    plan = Plan(data="digits", teacher="t.pt", stages=[Stage("student", scheme, TINY, teachers, None, {}, train)])
    runner.run_plan(plan, digits, tmp_path / "run", teacher=teacher, echo=lambda _: None)
    (made,) = built
    b = batch()
    made.eval()
    student = made.deployable()
    expected = F.cross_entropy(student(b.x), b.y, label_smoothing=0.3)
    terms = made(b)
    ce = terms["ce"] / (made.ce_weight if scheme == "offline" else 1.0)
    assert torch.allclose(ce, expected, atol=1e-6)


def test_label_smoothing_a_scheme_cannot_apply_is_refused(digits, tmp_path):
    from recipes.plan import Plan, Stage
    from recipes.runner import run_plan

    train = {"epochs": 1, "progress": "off", "device": "cpu", "label_smoothing": 0.1}
    plan = Plan(data="digits", stages=[Stage("student", "osakd", TINY, [], None, {}, train)])
    with pytest.raises(UserError, match="label_smoothing.*osakd"):
        run_plan(plan, digits, tmp_path / "run", echo=lambda _: None)
    assert not (tmp_path / "run" / "stages" / "student" / "log.jsonl").exists()


# ---------------------------------------------------------------- the official TAKD and DGKD protocols as presets


def official_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Their ``nn.KLDivLoss()(log_softmax(s / T), softmax(t / T))``: PyTorch's default reduction
    averages over every element, batch AND classes (written out, without the deprecation warning)."""
    p_t = F.softmax(teacher_logits / t, dim=1)
    return (p_t * (p_t.log() - F.log_softmax(student_logits / t, dim=1))).sum() / student_logits.numel()


def _preset(name):
    from recipes.planner import preset_plan
    from recipes.preset import load_preset
    from recipes.request import PlanRequest

    return preset_plan(load_preset(name), PlanRequest(teacher="t.pt"), data=None)


def test_takd_preset_is_the_official_chain_and_loss():
    plan = _preset("cifar100_takd_resnet110_resnet20_resnet8")
    assert plan.recipe == "takd" and plan.teacher_arch == "resnet110"
    assert [(s.arch, s.scheme, s.teachers) for s in plan.stages] == [
        ("resnet20", "offline", ["teacher"]), ("resnet8", "offline", ["ta1"])]
    train = plan.final.train
    assert (train.epochs, train.batch_size, train.lr, train.milestones, train.weight_decay) == (
        160, 128, 0.01, (120,), 1e-4)
    assert train.nesterov is False and train.augment is False
    # (1 - lambda) CE + lambda T^2 KLDivLoss(), lambda = 1, T = 5, on CIFAR-100's 100 classes
    stage = plan.final
    teacher, b = tiny("resnet8", classes=100, seed=1).eval(), batch()
    scheme = build_scheme("offline", SchemeRequest(TINY, 100, SHAPE, 64, teacher=teacher, method=stage.method,
                                                   options=dict(stage.options)))
    scheme.eval()
    ours = sum(scheme(b).values())
    official = 25 * official_kl(scheme.student(b.x), teacher(b.x), 5.0)
    assert torch.allclose(ours, official, rtol=1e-5)


def test_dgkd_preset_is_the_official_chain_loss_and_drop():
    plan = _preset("cifar100_dgkd_resnet26_resnet20_resnet14_resnet8")
    assert plan.recipe == "dgkd" and plan.teacher_arch == "resnet_d26_w1"
    assert [(s.arch, s.scheme, s.teachers) for s in plan.stages] == [
        ("resnet20", "offline", ["teacher"]), ("resnet14", "dgkd", ["teacher", "ta1"]),
        ("resnet8", "dgkd", ["teacher", "ta1", "ta2"])]
    train = plan.final.train
    assert (train.epochs, train.batch_size, train.lr, train.milestones, train.gamma) == (
        160, 128, 0.1, (80, 120), 0.1)
    assert train.weight_decay == 1e-4 and train.augment is False
    # lambda = 1: no cross-entropy; T = 5; lambda T^2 sum over the kept teachers of KLDivLoss(); one dropped a batch
    stage = plan.final
    teachers = [tiny("resnet8", classes=100, seed=i).eval() for i in (1, 2, 3)]
    b = batch()
    scheme = build_scheme("dgkd", SchemeRequest(TINY, 100, SHAPE, 64, teacher=teachers[0], method=stage.method,
                                                options=dict(stage.options), teachers=teachers))
    scheme.eval()
    torch.manual_seed(0)
    terms = scheme(b)
    assert "ce" not in terms and sum(scheme.last_dropped) == 1
    s = scheme.student(b.x)
    official = 25 * sum(official_kl(s, t(b.x), 5.0) for t, gone in zip(teachers, scheme.last_dropped) if not gone)
    assert torch.allclose(sum(terms.values()), official, rtol=1e-4)  # float32 KL over 100 classes at T=5: the sums differ by ~5e-5 relative across oneDNN kernels
