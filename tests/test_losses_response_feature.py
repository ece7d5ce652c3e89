"""Response (hinton, dkd, bss) and feature (fitnet, at, fsp, semckd) knowledge losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps, ModelOutputs, TapLayout, TapShape
from compressor.knowledge import build_loss, list_losses, loss_class
from compressor.knowledge._stages import match_by_depth
from compressor.knowledge.base import LossContext

K = 10  # classes
N = 8  # batch
LOGIT_LOSSES = ["hinton", "dkd"]
FEATURE_LOSSES = ["fitnet", "at", "fsp", "semckd"]


# ----------------------------------------------------------------------------- fixtures by hand


def make_layout(stages, stem=None, embedding_dim=16, num_classes=K) -> TapLayout:
    shapes = tuple(TapShape(f"s{i}", c, h, w) for i, (c, h, w) in enumerate(stages))
    stem_shape = TapShape("stem", *stem) if stem else None
    return TapLayout((3, 32, 32), stem_shape, shapes, embedding_dim, num_classes)


def make_outputs(layout: TapLayout, n: int = N, grad: bool = False, gen: torch.Generator | None = None) -> ModelOutputs:
    """Random non-negative maps (as after a ReLU) shaped like the layout, as leaf tensors."""

    def rnd(*shape, relu=True):
        t = torch.randn(*shape, generator=gen)
        return (t.relu() if relu else t).requires_grad_(grad)

    features = [rnd(n, s.channels, s.height, s.width) for s in layout.stages]
    stem = rnd(n, layout.stem.channels, layout.stem.height, layout.stem.width) if layout.stem else None
    return ModelOutputs(rnd(n, layout.num_classes, relu=False), features, rnd(n, layout.embedding_dim), stem)


def clone_outputs(out: ModelOutputs, grad: bool = False) -> ModelOutputs:
    c = lambda t: None if t is None else t.detach().clone().requires_grad_(grad)  # noqa: E731
    return ModelOutputs(c(out.logits), [c(f) for f in out.features], c(out.embedding), c(out.stem))


def make_ctx(student: TapLayout, teacher: TapLayout) -> LossContext:
    return LossContext(student, teacher, K, 1000)


def make_batch(n: int = N, gen: torch.Generator | None = None) -> Batch:
    return Batch(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, K, (n,), generator=gen), torch.arange(n))


SAME = make_layout([(8, 8, 8), (16, 4, 4), (32, 2, 2)], stem=(8, 8, 8), embedding_dim=32)
# (student, teacher): other channels, grids, stage counts, a missing stem, non-square maps
HETERO = {
    "fewer-student-stages": (
        make_layout([(6, 8, 8), (12, 4, 4)], stem=(4, 8, 8)),
        make_layout([(16, 16, 16), (24, 8, 8), (32, 4, 4), (48, 2, 2)], stem=(8, 16, 16), embedding_dim=48),
    ),
    "more-student-stages": (
        make_layout([(4, 16, 16), (8, 8, 8), (12, 4, 4), (20, 2, 2)], stem=(4, 16, 16)),
        make_layout([(16, 8, 8), (32, 4, 4)], stem=None, embedding_dim=32),
    ),
    "student-grids-larger-odd": (
        make_layout([(6, 12, 12), (10, 6, 6), (14, 3, 3)], stem=(3, 12, 12)),
        make_layout([(8, 4, 4), (16, 2, 2), (32, 1, 1)], stem=(8, 8, 8)),
    ),
    "non-square": (
        make_layout([(5, 8, 6), (7, 4, 3)], stem=None),
        make_layout([(9, 4, 4), (11, 2, 2)], stem=None),
    ),
}


# small but still heterogeneous (channels, grids, 2 vs 3 stages): for the loops that train
SMALL = (
    make_layout([(4, 8, 8), (6, 4, 4)], stem=(4, 8, 8)),
    make_layout([(6, 8, 8), (8, 4, 4), (10, 2, 2)], stem=(6, 8, 8), embedding_dim=10),
)


def all_outputs(s_layout, t_layout, n=N, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return make_outputs(s_layout, n, grad, gen), make_outputs(t_layout, n, grad, gen), make_batch(n, gen)


# ----------------------------------------------------------------------------- registry and matching


def test_registered_with_kind_and_paper_weights():
    expected = {"hinton": 0.9, "dkd": 1.0, "bss": 1.0, "fitnet": 100.0, "at": 1000.0, "fsp": 1.0, "semckd": 400.0}
    for name, weight in expected.items():
        cls = loss_class(name)
        assert cls.default_weight == weight, name
    assert {"hinton", "dkd", "bss"} <= set(list_losses("response"))
    assert set(FEATURE_LOSSES) <= set(list_losses("feature"))
    assert loss_class("bss").needs_models and not loss_class("hinton").needs_models


def test_match_by_depth_pairs_relative_depth():
    assert match_by_depth(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert match_by_depth(2, 4) == [(0, 0), (1, 3)]
    assert match_by_depth(4, 2) == [(0, 0), (3, 1)]
    assert match_by_depth(3, 5) == [(0, 0), (1, 2), (2, 4)]
    assert match_by_depth(1, 3) == [(0, 2)]


# ----------------------------------------------------------------------------- hinton


def test_hinton_hand_computed():
    ctx = make_ctx(SAME, SAME)
    loss = build_loss("hinton", ctx)  # T = 4
    t = torch.tensor([[4 * math.log(3.0), 0.0]])  # softmax(t / 4) = [0.75, 0.25]
    s = torch.zeros(1, 2)  # softmax = [0.5, 0.5]
    out_s, out_t = ModelOutputs(s, [], s), ModelOutputs(t, [], t)
    expected = 16 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert loss(out_s, out_t, make_batch(1)).item() == pytest.approx(expected, rel=1e-5)
    assert loss(out_t, out_t, make_batch(1)).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- dkd


def reference_dkd(s, t, y, alpha, beta, temp):
    """mdistiller-style DKD written independently: masks and a -1000 logit for NCKD."""
    gt = F.one_hot(y, s.shape[1]).float()
    p_s, p_t = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temp**2
    q_t = F.softmax(t / temp - 1000 * gt, 1)
    log_q_s = F.log_softmax(s / temp - 1000 * gt, 1)
    nckd = (q_t * ((q_t + 1e-30).log() - log_q_s)).sum(1).mean() * temp**2
    return alpha * tckd + beta * nckd


def test_dkd_matches_reference_and_is_zero_for_equal_logits():
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=1)
    loss = build_loss("dkd", make_ctx(SAME, SAME))
    got = loss(s_out, t_out, batch)
    want = reference_dkd(s_out.logits, t_out.logits, batch.y, 1.0, 8.0, 4.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert loss(t_out, t_out, batch).item() == pytest.approx(0.0, abs=1e-5)


def test_dkd_decomposes_kd():
    """Zhao et al. Eq. 5 for one sample: KD = TCKD + (1 - p_t^target) * NCKD."""
    from compressor.knowledge.dkd import dkd_terms
    from compressor.knowledge.hinton import soft_kl

    gen = torch.Generator().manual_seed(3)
    s, t, y = torch.randn(1, K, generator=gen), torch.randn(1, K, generator=gen), torch.tensor([4])
    tckd, nckd = dkd_terms(s, t, y, 2.0)
    kd = soft_kl(s, t, 2.0) * 4.0
    p_target = F.softmax(t / 2.0, 1)[0, 4]
    assert kd.item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-5)


def test_dkd_warmup_follows_epoch():
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=2)
    loss = build_loss("dkd", make_ctx(SAME, SAME))
    full = loss(s_out, t_out, batch).item()
    loss.set_epoch(0, 240)  # first epoch: 1/20 of the weight
    assert loss(s_out, t_out, batch).item() == pytest.approx(full / 20, rel=1e-5)
    loss.set_epoch(9, 240)
    assert loss(s_out, t_out, batch).item() == pytest.approx(full / 2, rel=1e-5)
    loss.set_epoch(19, 240)
    assert loss(s_out, t_out, batch).item() == pytest.approx(full, rel=1e-5)


# ----------------------------------------------------------------------------- at


def test_at_matches_equation_and_pools_the_larger_map():
    s_layout = make_layout([(3, 4, 4), (5, 2, 2)])
    t_layout = make_layout([(7, 2, 2), (9, 2, 2)])
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=4)
    loss = build_loss("at", make_ctx(s_layout, t_layout))
    want = 0.0
    for f_s, f_t in zip(s_out.features, t_out.features):
        if f_s.shape[-1] != f_t.shape[-1]:  # 4x4 -> 2x2 by averaging 2x2 blocks
            f_s = f_s.view(N, f_s.shape[1], 2, 2, 2, 2).mean(dim=(3, 5))
        q_s, q_t = f_s.pow(2).sum(1).flatten(1), f_t.pow(2).sum(1).flatten(1)
        q_s, q_t = q_s / q_s.norm(dim=1, keepdim=True), q_t / q_t.norm(dim=1, keepdim=True)
        want += ((q_s - q_t) ** 2).mean()
    assert loss(s_out, t_out, batch).item() == pytest.approx(want.item(), rel=1e-5)
    same = build_loss("at", make_ctx(SAME, SAME))
    o, _, b = all_outputs(SAME, SAME, seed=5)
    assert same(o, clone_outputs(o), b).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- fsp


def test_fsp_matches_equation_and_is_zero_for_equal_features():
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=6)
    loss = build_loss("fsp", make_ctx(SAME, SAME))
    assert all(isinstance(p, nn.Identity) for p in loss.projections)  # equal channels: nothing learned

    def fsp(a, b):
        h, w = a.shape[-2:]
        if b.shape[-2:] != (h, w):  # pool the larger (a) to the smaller grid, 2x2 blocks here
            a = a.view(a.shape[0], a.shape[1], b.shape[-2], h // b.shape[-2], b.shape[-1], w // b.shape[-1]).mean(
                dim=(3, 5)
            )
            h, w = a.shape[-2:]
        g = torch.zeros(a.shape[0], a.shape[1], b.shape[1])
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                g[:, i, j] = (a[:, i] * b[:, j]).sum(dim=(1, 2)) / (h * w)
        return g

    chain_s = [s_out.stem, *s_out.features]
    chain_t = [t_out.stem, *t_out.features]
    want = sum(((fsp(a, b) - fsp(c, d)) ** 2).mean() for a, b, c, d in zip(chain_s, chain_s[1:], chain_t, chain_t[1:]))
    assert loss(s_out, t_out, batch).item() == pytest.approx(want.item(), rel=1e-5)
    assert loss(s_out, clone_outputs(s_out), batch).item() == pytest.approx(0.0, abs=1e-9)


def test_fsp_projects_only_mismatched_channels_and_drops_a_missing_stem():
    s_layout, t_layout = HETERO["more-student-stages"]  # teacher has no stem
    loss = build_loss("fsp", make_ctx(s_layout, t_layout))
    assert not loss.use_stem
    assert [type(p).__name__ for p in loss.projections] == ["Conv2d", "Conv2d"]
    s_layout2 = make_layout([(8, 8, 8), (5, 4, 4)], stem=(8, 8, 8))
    t_layout2 = make_layout([(8, 8, 8), (16, 4, 4)], stem=(8, 8, 8))
    loss2 = build_loss("fsp", make_ctx(s_layout2, t_layout2))
    assert [type(p).__name__ for p in loss2.projections] == ["Identity", "Identity", "Conv2d"]


# ----------------------------------------------------------------------------- fitnet


def test_fitnet_identity_regressor_gives_zero_and_the_hand_value():
    loss = build_loss("fitnet", make_ctx(SAME, SAME))  # hint_layer=2 -> second stage
    conv = loss.regressor.conv
    assert conv.kernel_size == (1, 1) and conv.in_channels == conv.out_channels == 16  # equal grids: 1x1
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(16):
            conv.weight[c, c, 0, 0] = 1.0
    loss.eval()  # BN with its initial statistics: x / sqrt(1 + eps)
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=7)
    assert loss(s_out, clone_outputs(s_out), batch).item() == pytest.approx(0.0, abs=1e-8)
    want = F.mse_loss(s_out.features[1] / math.sqrt(1 + 1e-5), t_out.features[1])
    assert loss(s_out, t_out, batch).item() == pytest.approx(want.item(), rel=1e-5)
    assert loss.relu_mode.item() == 1  # non-negative hints: the regressor ends in a ReLU


def test_fitnet_picks_stages_and_adapts_grids():
    s_layout, t_layout = HETERO["fewer-student-stages"]
    loss = build_loss("fitnet", make_ctx(s_layout, t_layout))  # student stage 2 of 2 -> teacher 4 of 4
    assert (loss.s_index, loss.t_index) == (1, 3)
    assert loss.regressor.conv.stride == (2, 2)  # 4x4 student -> 2x2 teacher
    stem = build_loss("fitnet", make_ctx(s_layout, t_layout), hint_layer=0)
    assert stem.regressor.conv.in_channels == 4 and stem.regressor.conv.out_channels == 8
    with pytest.raises(UserError, match="hint_layer=3"):
        build_loss("fitnet", make_ctx(s_layout, t_layout), hint_layer=3)
    no_stem_t = HETERO["more-student-stages"]
    with pytest.raises(UserError, match="stem"):
        build_loss("fitnet", make_ctx(*no_stem_t), hint_layer=0)


def test_fitnet_relu_follows_the_hint_sign_and_survives_state_dict():
    assert build_loss("fitnet", make_ctx(SAME, SAME)).relu_mode.item() == 1  # ConvReg's use_relu=True
    loss = build_loss("fitnet", make_ctx(SAME, SAME), relu=None)
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=8)
    t_out.features[1] = t_out.features[1] - 1.0  # negative hints: no ReLU
    loss(s_out, t_out, batch)
    assert loss.relu_mode.item() == 0
    fresh = build_loss("fitnet", make_ctx(SAME, SAME), relu=None)
    fresh.load_state_dict(loss.state_dict())
    assert fresh._relu is False


@pytest.mark.parametrize(
    "student_grid,teacher_grid,conv_type,kernel,stride,padding",
    [
        ((4, 4), (4, 4), nn.Conv2d, (1, 1), (1, 1), (0, 0)),  # equal: 1x1
        ((8, 8), (4, 4), nn.Conv2d, (3, 3), (2, 2), (1, 1)),  # student twice as large: strided 3x3
        ((2, 2), (4, 4), nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),  # half as large: transposed 4x4
        ((6, 5), (4, 4), nn.Conv2d, (3, 2), (1, 1), (0, 0)),  # larger otherwise: kernel 1 + difference
    ],
)
def test_fitnet_regressor_is_repdistillers_convreg(student_grid, teacher_grid, conv_type, kernel, stride, padding):
    # RepDistiller models/util.py ConvReg: conv, then BatchNorm, then ReLU
    s_layout = make_layout([(6, 16, 16), (5, *student_grid)])
    t_layout = make_layout([(8, 16, 16), (12, *teacher_grid)])
    loss = build_loss("fitnet", make_ctx(s_layout, t_layout))
    conv = loss.regressor.conv
    assert type(conv) is conv_type
    assert (conv.kernel_size, conv.stride, conv.padding) == (kernel, stride, padding)
    assert conv.bias is not None  # ConvReg keeps the conv's bias
    if conv_type is nn.ConvTranspose2d:
        assert conv.weight.shape == (5, 12, *kernel)
    else:
        assert conv.weight.shape == (12, 5, *kernel)
    assert isinstance(loss.regressor.bn, nn.BatchNorm2d) and loss.regressor.bn.num_features == 12
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=3)
    pred, target = loss.regressor(s_out.features[1], t_out.features[1], relu=True)
    assert pred.shape == target.shape == (N, 12, *teacher_grid)  # the hint's own grid, never pooled
    assert (pred >= 0).all()


def test_fitnet_regressor_pools_the_hint_where_convreg_has_no_rule():
    s_layout = make_layout([(6, 16, 16), (5, 2, 2)])
    t_layout = make_layout([(8, 16, 16), (12, 8, 8)])  # student a quarter of the teacher's grid
    loss = build_loss("fitnet", make_ctx(s_layout, t_layout))
    assert loss.regressor.conv.kernel_size == (1, 1) and loss.regressor.pool_hint
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=4)
    pred, target = loss.regressor(s_out.features[1], t_out.features[1], relu=True)
    assert pred.shape == target.shape == (N, 12, 2, 2)
    assert torch.allclose(target, F.adaptive_avg_pool2d(t_out.features[1], 2))


# ----------------------------------------------------------------------------- semckd


def reference_semckd(loss, s_maps, t_maps):
    """Eqs. 4-6 by explicit loops over samples, using the loss's own MLPs and projections."""
    n, b = s_maps[0].shape[0], loss.batch_size
    q, k = [], []
    for mlp, f in zip(loss.queries, s_maps):
        sim = torch.zeros(n, b)
        sim[:, :n] = f.flatten(1) @ f.flatten(1).t()
        q.append(mlp(sim))
    for mlp, f in zip(loss.keys, t_maps):
        sim = torch.zeros(n, b)
        sim[:, :n] = f.flatten(1) @ f.flatten(1).t()
        k.append(mlp(sim))
    preds, targets = {}, {}
    for l, f_s in enumerate(s_maps):
        for m, f_t in enumerate(t_maps):
            hs, ht = f_s.shape[-1], f_t.shape[-1]
            src = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:]) if hs > ht else f_s
            targets[l, m] = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:]) if ht > hs else f_t
            preds[l, m] = loss.projections[l][m](src)
    total = 0.0
    for i in range(n):
        for l in range(len(s_maps)):
            energies = torch.stack([q[l][i] @ k[m][i] for m in range(len(t_maps))])
            alpha = torch.exp(energies) / torch.exp(energies).sum()
            for m in range(len(t_maps)):
                total = total + alpha[m] * ((preds[l, m][i] - targets[l, m][i]) ** 2).mean()
    return total / (n * len(s_maps))


def test_semckd_matches_explicit_loops_with_padding():
    s_layout, t_layout = SMALL
    loss = build_loss("semckd", make_ctx(s_layout, t_layout), batch_size=12)
    s_out, t_out, batch = all_outputs(s_layout, t_layout, n=6, seed=9)  # 6 < 12: padded
    got = loss(s_out, t_out, batch)
    want = reference_semckd(loss, s_out.features, t_out.features)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    alpha = loss.attention(s_out.features, t_out.features)
    assert alpha.shape == (6, 2, 3)
    assert torch.allclose(alpha.sum(-1), torch.ones(6, 2))


def test_semckd_rejects_a_batch_larger_than_its_size():
    loss = build_loss("semckd", make_ctx(SAME, SAME), batch_size=4)
    s_out, t_out, batch = all_outputs(SAME, SAME, n=N)
    with pytest.raises(UserError, match="batch_size"):
        loss(s_out, t_out, batch)


# semckd has no zero-at-equality check: its projections are 1x1-3x3-1x1 conv stacks with BN and
# ReLU in between, which cannot be initialised to the identity, and it matches every student
# stage to every teacher stage, so equal networks still compare stage 1 with stage 3.


# ----------------------------------------------------------------------------- every loss: grads, training, layouts


def build(name, s_layout, t_layout):
    kw = {"batch_size": N} if name == "semckd" else {}
    return build_loss(name, make_ctx(s_layout, t_layout), **kw)


@pytest.mark.parametrize("name", LOGIT_LOSSES + FEATURE_LOSSES)
def test_gradients_reach_student_and_loss_parts_never_teacher(name):
    s_layout, t_layout = HETERO["fewer-student-stages"]
    loss = build(name, s_layout, t_layout)
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=10, grad=True)
    value = loss(s_out, t_out, batch)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    student_leaves = [s_out.logits, s_out.embedding, s_out.stem, *s_out.features]
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in student_leaves)
    teacher_leaves = [t_out.logits, t_out.embedding, t_out.stem, *t_out.features]
    assert all(t.grad is None for t in teacher_leaves)
    params = list(loss.parameters())
    if name in ("fitnet", "fsp", "semckd"):
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    else:
        assert not params


@pytest.mark.parametrize("name", LOGIT_LOSSES + FEATURE_LOSSES)
def test_optimising_the_student_lowers_the_loss(name):
    s_layout, t_layout = SMALL
    torch.manual_seed(0)
    loss = build(name, s_layout, t_layout)
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=11, grad=True)
    leaves = [t for t in [s_out.logits, s_out.embedding, s_out.stem, *s_out.features]]
    opt = torch.optim.Adam(leaves + list(loss.parameters()), lr=0.05)
    first = None
    for _ in range(40):
        value = loss(s_out, t_out, batch)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss(s_out, t_out, batch).item() < 0.5 * first


@pytest.mark.parametrize("case", list(HETERO))
@pytest.mark.parametrize("name", LOGIT_LOSSES + FEATURE_LOSSES)
def test_heterogeneous_layouts(name, case):
    s_layout, t_layout = HETERO[case]
    loss = build(name, s_layout, t_layout)
    s_out, t_out, batch = all_outputs(s_layout, t_layout, seed=12, grad=True)
    value = loss(s_out, t_out, batch)
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    value.backward()
    assert any(f.grad is not None for f in [s_out.logits, *s_out.features])


def test_gram_sums_stay_in_float32_under_autocast():
    """FSP matrices and SemCKD similarities overflow half precision on real maps: autocast is off."""
    s_out, t_out, batch = all_outputs(SAME, SAME, seed=13)
    s_out.features[2] = s_out.features[2] * 300  # entries whose products leave bfloat16's precision
    fsp = build("fsp", SAME, SAME)
    semckd = build("semckd", SAME, SAME)
    plain = fsp(s_out, t_out, batch), semckd.attention(s_out.features, t_out.features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fsp(s_out, t_out, batch), semckd.attention(s_out.features, t_out.features)
    assert mixed[0].dtype == torch.float32 and mixed[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert torch.allclose(mixed[1], plain[1], atol=1e-6)


# ----------------------------------------------------------------------------- bss with tiny models


class TinyNet(nn.Module):
    stem_name, stage_names, classifier_name = "stem", ("layer1", "layer2"), "fc"

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, K)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def bss_setup(seed=0):
    torch.manual_seed(seed)
    teacher, student = TinyNet(8).eval(), TinyNet(4)
    for p in teacher.parameters():
        p.requires_grad_(False)
    # a confident teacher, as a trained one is: logit margins of order one, not 0.01
    teacher.fc.weight.data.mul_(100)
    teacher.fc.bias.data.mul_(100)
    t_taps, s_taps = FeatureTaps(teacher), FeatureTaps(student)
    ctx = LossContext(s_taps.layout((3, 8, 8)), t_taps.layout((3, 8, 8)), K, 100)
    loss = build_loss("bss", ctx)
    loss.bind_models(s_taps, t_taps)
    x = torch.randn(16, 3, 8, 8).clamp(-2.5, 2.5)
    with torch.no_grad():
        y = teacher(x).argmax(1)  # the teacher is right on every sample
    return loss, student, teacher, s_taps, t_taps, Batch(x, y, torch.arange(16))


def test_bss_select_takes_correct_samples_and_non_top_targets():
    loss, student, teacher, s_taps, t_taps, batch = bss_setup()
    with torch.no_grad():
        t_logits, s_logits = teacher(batch.x), student(batch.x)
    labels = batch.y.clone()
    labels[:8] = (labels[:8] + 1) % K  # the teacher is wrong on the first half
    s_logits = t_logits + 0.01 * s_logits  # a student right wherever the teacher is
    idx, target = loss.select(s_logits, t_logits, labels)
    assert len(idx) == 4  # a quarter of 16
    assert (idx >= 8).all()
    assert (target != t_logits[idx].argmax(1)).all()


def test_bss_base_samples_are_those_both_teacher_and_student_get_right():
    # the authors' code: attack_flag = (teacher top-1 == y) & (student top-1 == y)
    loss, *_ = bss_setup()
    loss.attack_fraction = 1.0  # no cap: the base set itself
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    teacher_says = torch.tensor([0, 1, 2, 3, 2, 3])  # right on 0..3
    student_says = torch.tensor([1, 1, 0, 3, 0, 1])  # right on 1, 3, 4, 5
    t_logits = 5.0 * F.one_hot(teacher_says, K).float()
    s_logits = 5.0 * F.one_hot(student_says, K).float()
    idx, target = loss.select(s_logits, t_logits, labels)
    assert sorted(idx.tolist()) == [1, 3]  # not 0, 2 (student wrong) nor 4, 5 (teacher wrong)
    assert (target != labels[idx]).all()
    # a teacher right everywhere does not make a base sample where the student is wrong
    none, _ = loss.select(5.0 * F.one_hot((labels + 1) % K, K).float(), 5.0 * F.one_hot(labels, K).float(), labels)
    assert none.numel() == 0


def test_bss_attack_moves_samples_toward_the_teacher_boundary():
    loss, student, teacher, s_taps, t_taps, batch = bss_setup(seed=1)
    with torch.no_grad():
        before = teacher(batch.x)
    target = before.topk(2, dim=1).indices[:, 1]
    x_adv = loss.attack(batch.x, target)
    with torch.no_grad():
        after = teacher(x_adv)
    margin = lambda z: (z.gather(1, batch.y[:, None]) - z.gather(1, target[:, None])).squeeze(1)  # noqa: E731
    top2 = lambda z: (lambda v: v[:, 0] - v[:, 1])(z.topk(2, dim=1).values)  # noqa: E731
    assert (margin(after) < margin(before)).all()
    assert top2(after).mean() < 0.5 * top2(before).mean()
    assert x_adv.abs().max() <= 2.5 + 1e-6
    assert not teacher.training


def reference_bss_attack(teacher, x, target, steps=10, eta=0.3, bound=2.5):
    """The authors' attack loop: every sample through every step, a stopped one with a zero step."""
    x_adv, base = x.clone(), None
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = teacher(x_adv)
        base = logits.argmax(1) if base is None else base
        active = (logits.argmax(1) == base).float()
        if active.sum() == 0:
            break
        f_b, f_k = logits.gather(1, base[:, None])[:, 0], logits.gather(1, target[:, None])[:, 0]
        (grad,) = torch.autograd.grad((f_k - f_b).sum(), x_adv)
        scale = eta * active * ((f_b - f_k).detach() + 1e-4) / grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        x_adv = (x_adv.detach() + scale[:, None, None, None] * grad).clamp(-bound, bound)
    return x_adv.detach()


@pytest.mark.parametrize("step_size", [0.3, 1.0])
def test_bss_attack_and_loss_match_the_authors_loop(step_size):
    """Passes run only on the samples still moving: the same samples and loss as running all."""
    loss, student, teacher, s_taps, t_taps, batch = bss_setup(seed=5)
    loss.step_size, loss.attack_fraction = step_size, 1.0
    with torch.no_grad():
        t_logits = teacher(batch.x)
    target = t_logits.topk(3, dim=1).indices.gather(1, (1 + torch.arange(16) % 2)[:, None]).squeeze(1)
    want = reference_bss_attack(teacher, batch.x, target, eta=step_size)
    assert torch.allclose(loss.attack(batch.x, target), want, atol=1e-5)
    with torch.no_grad():  # samples stop at different steps, some never: every path of the loop runs
        crossed = teacher(want).argmax(1) != t_logits.argmax(1)
    assert 0 < int(crossed.sum()) < 16

    from compressor.knowledge.hinton import soft_kl

    # a student that agrees with the teacher, so every sample is a base sample
    twin = copy.deepcopy(teacher).eval().requires_grad_(True)
    loss.bind_models(FeatureTaps(twin), t_taps)
    with torch.no_grad():
        t_out = t_taps(batch.x)
    s_out = loss._student(batch.x)
    torch.manual_seed(0)
    got = loss(s_out, t_out, batch)
    torch.manual_seed(0)
    idx, tgt = loss.select(s_out.logits, t_out.logits, batch.y)
    assert idx.numel() == 16
    x_bss = reference_bss_attack(teacher, batch.x[idx], tgt, eta=step_size)
    with torch.no_grad():
        t_bss = teacher(x_bss)
    expected = loss.kd_ratio * soft_kl(s_out.logits, t_out.logits, 3.0) + loss.attack_ratio * soft_kl(
        twin(x_bss), t_bss, 3.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bss_step_leaves_the_teacher_untouched_and_trains_the_student():
    loss, student, teacher, s_taps, t_taps, batch = bss_setup(seed=2)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

    def value(seed):
        torch.manual_seed(seed)  # the same target classes each time
        with torch.no_grad():
            t_out = t_taps(batch.x)
        return loss(s_taps(batch.x), t_out, batch)

    first = value(0).item()
    for step in range(15):
        v = value(step)
        opt.zero_grad()
        v.backward()
        opt.step()
    assert value(0).item() < first
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k]), k  # weights and BN running statistics alike
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert not list(loss.parameters())  # the bound models are not sub-modules of the loss


def test_bss_schedule_and_attack_switch_off():
    loss, student, teacher, s_taps, t_taps, batch = bss_setup(seed=3)
    assert (loss.kd_ratio, loss.attack_ratio) == (4.0, 2.0)
    loss.set_epoch(0, 80)  # authors' code: epoch 1 of 80
    assert loss.kd_ratio == pytest.approx(4 - 3 / 80)
    assert loss.attack_ratio == pytest.approx(2 * (1 - 4 / 3 / 80))
    loss.set_epoch(59, 80)  # epoch 60 of 80 = 3/4: no more attacks
    assert loss.attack_ratio == 0.0
    calls = []
    t_taps.model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        t_out = ModelOutputs(teacher(batch.x), [], batch.x)
    calls.clear()
    s_out = s_taps(batch.x)
    from compressor.knowledge.hinton import soft_kl

    got = loss(s_out, t_out, batch)
    assert not calls  # the teacher was not run again
    assert got.item() == pytest.approx((loss.kd_ratio * soft_kl(s_out.logits, t_out.logits, 3.0)).item(), rel=1e-6)


def test_bss_runs_the_teacher_in_eval_mode_whatever_mode_it_is_in():
    loss, student, teacher, s_taps, t_taps, batch = bss_setup(seed=4)
    with torch.no_grad():
        t_out = t_taps(batch.x)
    teacher.train()  # a scheme that forgot to freeze it: the attack must still not touch BN statistics
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss(s_taps(batch.x), t_out, batch)
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    assert teacher.training  # its mode is given back as it was
