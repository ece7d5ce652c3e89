"""Relation knowledge losses (sp, rkd_*, pkt, crd) and the method-spec parser."""

from __future__ import annotations

import io
import os
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import FeatureTaps, ModelOutputs, TapLayout, TapShape
from compressor.knowledge import KnowledgeLoss, LossContext, build_loss, list_losses, loss_class, register_loss
from compressor.knowledge import base as knowledge_base
from compressor.knowledge.spec import MethodSpec, parse_method, parse_method_spec

RELATION = ["sp", "rkd_d", "rkd_a", "rkd_da", "pkt", "crd"]
STRUCTURAL = ["sp", "rkd_d", "rkd_a", "rkd_da", "pkt"]  # zero when the student equals the teacher


# ---------------------------------------------------------------- builders


def layout(stages: list[tuple[int, int]], embedding_dim: int, num_classes: int = 5) -> TapLayout:
    shapes = tuple(TapShape(f"stage{i}", c, s, s) for i, (c, s) in enumerate(stages))
    return TapLayout((3, 16, 16), None, shapes, embedding_dim, num_classes)


STUDENT = layout([(4, 8), (8, 4)], embedding_dim=8)
TEACHER = layout([(6, 8), (16, 2)], embedding_dim=24)  # other channels, spatial sizes, embedding


def context(n: int = 40, student: TapLayout = STUDENT, teacher: TapLayout = TEACHER) -> LossContext:
    return LossContext(student, teacher, num_classes=5, num_train_samples=n)


def outputs(lay: TapLayout, b: int, requires_grad: bool = False, seed: int = 0) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    features = [t(b, s.channels, s.height, s.width) for s in lay.stages]
    return ModelOutputs(t(b, lay.num_classes), features, t(b, lay.embedding_dim))


def labels_of(n: int) -> torch.Tensor:
    """The toy training split's labels: sample i is of class i % 5."""
    return torch.arange(n) % 5


def batch_of(index: list[int] | torch.Tensor) -> Batch:
    index = torch.as_tensor(index, dtype=torch.long)
    b = index.numel()
    return Batch(torch.zeros(b, 3, 16, 16), index % 5, index)


def build(name: str, ctx: LossContext, **hparams) -> KnowledgeLoss:
    """A loss with the training labels bound, as the trainer binds them (only CRD keeps them)."""
    loss = build_loss(name, ctx, **hparams)
    loss.set_train_labels(labels_of(ctx.num_train_samples))
    return loss


def embeddings(student: torch.Tensor, teacher: torch.Tensor) -> tuple[ModelOutputs, ModelOutputs]:
    """Outputs carrying only embeddings (and one 1x1 'stage' of the same vectors)."""
    s = ModelOutputs(torch.zeros(len(student), 5), [student[:, :, None, None]], student)
    t = ModelOutputs(torch.zeros(len(teacher), 5), [teacher[:, :, None, None]], teacher)
    return s, t


def emb_ctx(ds: int, dt: int, n: int = 40) -> LossContext:
    return context(n, layout([(ds, 1)], ds), layout([(dt, 1)], dt))


def huber(x: torch.Tensor) -> torch.Tensor:
    """Huber loss with delta = 1, elementwise (Park et al., Eq. 5)."""
    a = x.abs()
    return torch.where(a < 1, 0.5 * x * x, a - 0.5)


# ---------------------------------------------------------------- independent reference implementations


def ref_sp(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def gram(f: torch.Tensor) -> list[list[float]]:
        q = f.reshape(b, -1).double()
        g = [[float(q[i] @ q[j]) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def ref_rkd_d(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def potential(e: torch.Tensor) -> torch.Tensor:
        e = e.double()
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(b)] for i in range(b)], dtype=torch.double)
        mu = d.sum() / (b * (b - 1))
        return d / mu

    return float(huber(potential(fs) - potential(ft)).mean())


def ref_rkd_a(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def potential(e: torch.Tensor) -> torch.Tensor:
        e = e.double()
        out = torch.zeros(b, b, b, dtype=torch.double)
        for j in range(b):
            for i in range(b):
                for k in range(b):
                    eij = F.normalize(e[i] - e[j], dim=0)
                    ekj = F.normalize(e[k] - e[j], dim=0)
                    out[j, i, k] = eij @ ekj
        return out

    return float(huber(potential(fs) - potential(ft)).mean())


def ref_pkt(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def probabilities(e: torch.Tensor) -> list[list[float]]:
        e = e.double()
        k = [[(float(F.cosine_similarity(e[i], e[j], dim=0)) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    p, q = probabilities(ft), probabilities(fs)
    return sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(b) for j in range(b)) / b**2


# ---------------------------------------------------------------- registry


def test_relation_losses_registered_with_paper_weights():
    expected = {"sp": 3000.0, "rkd_d": 1.0, "rkd_a": 1.0, "rkd_da": 1.0, "pkt": 30000.0, "crd": 0.8}
    assert set(expected) <= set(list_losses("relation"))
    for name, weight in expected.items():
        cls = loss_class(name)
        assert cls.kind == "relation" and cls.name == name
        assert cls.default_weight == weight


# ---------------------------------------------------------------- values


def test_sp_hand_computed():
    # student rows (1,0), (1,1): G~ = [[1,1],[1,2]]; teacher (1,0), (0,1): G = I
    fs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])[:, :, None, None]
    ft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None, None]
    expected = ((1 / math.sqrt(2) - 1) ** 2 + 0.5 + 0.2 + (2 / math.sqrt(5) - 1) ** 2) / 4
    loss = build("sp", emb_ctx(2, 2))
    s = ModelOutputs(torch.zeros(2, 5), [fs], fs.flatten(1))
    t = ModelOutputs(torch.zeros(2, 5), [ft], ft.flatten(1))
    assert loss(s, t, batch_of([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_sp_matches_reference_on_last_stage():
    s, t = outputs(STUDENT, 6, seed=1), outputs(TEACHER, 6, seed=2)
    loss = build("sp", context())
    assert loss(s, t, batch_of(range(6))).item() == pytest.approx(ref_sp(s.features[-1], t.features[-1]), rel=1e-5)
    first = build("sp", context(), stage=0)
    assert first(s, t, batch_of(range(6))).item() == pytest.approx(ref_sp(s.features[0], t.features[0]), rel=1e-5)


def test_sp_rejects_missing_stage():
    with pytest.raises(UserError, match="stage 5"):
        build("sp", context(), stage=5)


def test_rkd_distance_hand_computed():
    # student 0,1,2 / teacher 0,1,3 on a line: normalised distances (.75,1.5,.75) vs (.5,1.5,1);
    # two pairs differ by .25 -> 4 ordered entries of Huber .03125 over 9 entries, times w_d = 25
    s, t = embeddings(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [1.0], [3.0]]))
    loss = build("rkd_d", emb_ctx(1, 1))
    assert loss(s, t, batch_of([0, 1, 2])).item() == pytest.approx(25 * 4 * 0.5 * 0.25**2 / 9, rel=1e-5)


def test_rkd_angle_hand_computed():
    # student: right isosceles triangle (cos 0, 1/sqrt2, 1/sqrt2); teacher: equilateral (cos .5)
    s, t = embeddings(
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]]),
    )
    expected = 50 * (2 * 0.5 * 0.5**2 + 4 * 0.5 * (0.5 - 1 / math.sqrt(2)) ** 2) / 27
    loss = build("rkd_a", emb_ctx(2, 2))
    assert loss(s, t, batch_of([0, 1, 2])).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("offset", [0.0, 50.0])  # far from the origin: the Gram form must stay exact
def test_rkd_matches_reference(offset):
    g = torch.Generator().manual_seed(3)
    fs = torch.randn(7, 8, generator=g) + offset
    ft = torch.randn(7, 24, generator=g) * 3 - offset
    s, t = embeddings(fs, ft)
    ctx = emb_ctx(8, 24)
    d, a = ref_rkd_d(fs, ft), ref_rkd_a(fs, ft)
    batch = batch_of(range(7))
    assert build("rkd_d", ctx)(s, t, batch).item() == pytest.approx(25 * d, rel=1e-4)
    assert build("rkd_a", ctx)(s, t, batch).item() == pytest.approx(50 * a, rel=1e-4)
    assert build("rkd_da", ctx)(s, t, batch).item() == pytest.approx(25 * d + 50 * a, rel=1e-4)
    custom = build("rkd_da", ctx, w_d=1.0, w_a=2.0)
    assert custom(s, t, batch).item() == pytest.approx(d + 2 * a, rel=1e-4)


def test_rkd_angle_degenerate_points_match_reference():
    # two coincident samples: their difference vector is zero, its cosines are 0 (as normalising gives)
    fs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    ft = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    s, t = embeddings(fs, ft)
    loss = build("rkd_a", emb_ctx(2, 2))(s, t, batch_of(range(4)))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(50 * ref_rkd_a(fs, ft), rel=1e-5)


def test_pkt_hand_computed():
    # student orthogonal: kernel rows (1, .5) -> p = (2/3, 1/3); teacher parallel: p = (.5, .5)
    s, t = embeddings(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    loss = build("pkt", emb_ctx(2, 2))
    assert loss(s, t, batch_of([0, 1])).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)


def test_pkt_matches_reference():
    s, t = outputs(STUDENT, 9, seed=4), outputs(TEACHER, 9, seed=5)
    loss = build("pkt", context())
    assert loss(s, t, batch_of(range(9))).item() == pytest.approx(ref_pkt(s.embedding, t.embedding), rel=1e-4)


@pytest.mark.parametrize("name", STRUCTURAL)
def test_zero_when_student_equals_teacher(name):
    same = outputs(STUDENT, 6, seed=6)
    student = ModelOutputs(same.logits, [f.clone() for f in same.features], same.embedding.clone())
    loss = build(name, context(student=STUDENT, teacher=STUDENT))
    assert loss(student, same, batch_of(range(6))).item() == pytest.approx(0.0, abs=1e-6)
    other = outputs(STUDENT, 6, seed=7)
    assert loss(other, same, batch_of(range(6))).item() > 1e-4


@pytest.mark.parametrize("name", STRUCTURAL)
def test_relation_losses_ignore_the_scale_of_the_representation(name):
    # every one of these compares normalised structure: scaling the student changes nothing
    s, t = outputs(STUDENT, 6, seed=8), outputs(TEACHER, 6, seed=9)
    scaled = ModelOutputs(s.logits, [3.0 * f for f in s.features], 3.0 * s.embedding)
    loss = build(name, context())
    batch = batch_of(range(6))
    assert loss(scaled, t, batch).item() == pytest.approx(loss(s, t, batch).item(), rel=1e-4)


@pytest.mark.parametrize("name", RELATION)
def test_autocast_does_not_lower_precision(name):
    s, t = outputs(STUDENT, 8, seed=10), outputs(TEACHER, 8, seed=11)
    torch.manual_seed(0)
    loss = build(name, context())
    loss.eval()  # CRD: no memory update, so both calls see the same banks
    batch = batch_of(range(8))
    torch.manual_seed(1)
    full = loss(s, t, batch)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(s, t, batch)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("name", RELATION)
@pytest.mark.parametrize("b", [1, 2])
def test_tiny_last_batches_stay_finite(name, b):
    # an epoch's last batch may hold one or two samples: no NaN in the loss or its gradients
    s, t = outputs(STUDENT, b, requires_grad=True, seed=24), outputs(TEACHER, b, seed=25)
    value = build(name, context())(s, t, batch_of(range(b)))
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(x.grad).all() for x in (*s.features, s.embedding) if x.grad is not None)


# ---------------------------------------------------------------- gradients and training


@pytest.mark.parametrize("name", RELATION)
def test_gradients_reach_student_and_loss_parameters_never_teacher(name):
    s, t = outputs(STUDENT, 6, requires_grad=True, seed=12), outputs(TEACHER, 6, requires_grad=True, seed=13)
    loss = build(name, context())
    loss(s, t, batch_of(range(6))).backward()
    student_grads = [x.grad for x in (*s.features, s.embedding) if x.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(x.grad is None for x in (t.logits, *t.features, t.embedding))
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in loss.buffers())


@pytest.mark.parametrize("name", RELATION)
def test_each_loss_trains(name):
    torch.manual_seed(0)
    s0, t = outputs(STUDENT, 8, seed=14), outputs(TEACHER, 8, seed=15)
    features = [nn.Parameter(f.clone()) for f in s0.features]
    embedding = nn.Parameter(s0.embedding.clone())
    loss = build(name, context(n=16))
    optimiser = torch.optim.Adam([*features, embedding, *loss.parameters()], lr=0.05)
    batch = batch_of(range(8))
    values = []
    for _ in range(40):
        value = loss(ModelOutputs(s0.logits, list(features), embedding), t, batch)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert values[-1] < 0.7 * values[0], values


class TinyNet(nn.Module):
    """A two-stage conv net that declares its taps, for an end-to-end heterogeneous pair."""

    stem_name = "stem"
    stage_names = ("stage1", "stage2")
    classifier_name = "fc"

    def __init__(self, width: int, second_stride: int, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=second_stride, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


@pytest.mark.parametrize("name", RELATION)
def test_heterogeneous_models_through_feature_taps(name):
    torch.manual_seed(0)
    student, teacher = TinyNet(width=3, second_stride=2), TinyNet(width=7, second_stride=1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_taps, t_taps = FeatureTaps(student), FeatureTaps(teacher)
    ctx = LossContext(s_taps.layout((3, 8, 8)), t_taps.layout((3, 8, 8)), 5, 20)
    assert ctx.student.stages[-1] != ctx.teacher.stages[-1]
    assert ctx.student.embedding_dim != ctx.teacher.embedding_dim
    loss = build(name, ctx)
    x = torch.randn(6, 3, 8, 8)
    value = loss(s_taps(x), t_taps(x), batch_of([1, 4, 7, 9, 12, 19]))
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert student.stage2[0].weight.grad is not None and student.stage2[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- CRD


@pytest.mark.parametrize("dense", [True, False], ids=["whole-bank", "gathered-rows"])
def test_crd_matches_reference_nce(dense):
    torch.manual_seed(0)
    crd = build("crd", context(n=30), num_negatives=20)
    crd._dense = lambda b: dense  # both ways of scoring give the authors' numbers
    s, t = outputs(STUDENT, 5, seed=16), outputs(TEACHER, 5, seed=17)
    index = torch.tensor([3, 8, 11, 20, 29])
    mem_s, mem_t = crd.memory_student.clone().double(), crd.memory_teacher.clone().double()
    torch.manual_seed(42)
    value = crd(s, t, batch_of(index))
    torch.manual_seed(42)
    negatives = crd.draw_negatives(index, index % 5)
    all_idx = torch.cat([index[:, None], negatives], dim=1)  # (b, 1 + K), positive first
    v_s = crd.embed_student(s.embedding).detach().double()
    v_t = crd.embed_teacher(t.embedding).detach().double()
    n, k, tau, eps = 30, 20, 0.07, 1e-7

    def side(anchor: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, float]:
        out = torch.exp(torch.einsum("bkd,bd->bk", memory[all_idx], anchor) / tau)
        z = float(out.mean()) * n  # the normalisation constant, set on this first batch
        p = out / z
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + k / n + eps))
        log_d0 = torch.log((k / n) / (p[:, 1:] + k / n + eps))
        return -(log_d1.sum() + log_d0.sum()) / 5, z

    loss_s, z_s = side(v_s, mem_t)  # student anchor against the teacher's memory
    loss_t, z_t = side(v_t, mem_s)
    assert value.item() == pytest.approx(float(loss_s + loss_t), rel=1e-4)
    assert crd.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-5)


def test_crd_scores_the_whole_bank_only_where_that_is_smaller():
    crd = build("crd", context(n=50000))  # CIFAR: 50000 x (64 + 128) values against 64 x 16384 x 128
    assert crd._dense(64)
    big = build("crd", context(n=1_281_167))  # ImageNet: gathering the rows is smaller
    assert not big._dense(64)


def test_crd_normalisation_constant_is_fixed_after_the_first_batch():
    crd = build("crd", context(n=30), num_negatives=20)
    assert torch.isnan(crd.log_z).all()
    crd(outputs(STUDENT, 4, seed=18), outputs(TEACHER, 4, seed=19), batch_of([0, 1, 2, 3]))
    first = crd.log_z.clone()
    assert torch.isfinite(first).all()
    crd(outputs(STUDENT, 4, seed=20), outputs(TEACHER, 4, seed=21), batch_of([4, 5, 6, 7]))
    assert torch.equal(crd.log_z, first)


def test_crd_memory_momentum_update_at_batch_indices_only():
    crd = build("crd", context(n=20), num_negatives=10)
    s, t = outputs(STUDENT, 3, seed=22), outputs(TEACHER, 3, seed=23)
    index = torch.tensor([2, 9, 17])
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    crd(s, t, batch_of(index))
    v_s, v_t = crd.embed_student(s.embedding).detach(), crd.embed_teacher(t.embedding).detach()
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    for before, after, v in ((before_s, crd.memory_student, v_s), (before_t, crd.memory_teacher, v_t)):
        assert torch.equal(after[others], before[others])
        expected = F.normalize(0.5 * before[index].float() + 0.5 * v, dim=1)
        assert torch.allclose(after[index].float(), expected, atol=2e-3)  # float16 storage
        assert torch.allclose(after[index].float().norm(dim=1), torch.ones(3), atol=2e-3)
    # eval mode (validation) never writes into the training memory
    crd.eval()
    frozen = crd.memory_student.clone()
    crd(s, t, batch_of([0, 1, 3]))
    assert torch.equal(crd.memory_student, frozen)


# RepDistiller dataset/cifar100.py, CIFAR100InstanceSample(mode='exact'): for each sample, k indices
# from cls_negative[target] (every sample of the other classes), replace = k > len(cls_negative[target])


def test_crd_negatives_come_from_other_classes_without_repeats():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2, 3])  # 12 samples; class 2 has 5, class 3 one
    crd = build_loss("crd", LossContext(STUDENT, TEACHER, num_classes=4, num_train_samples=12), num_negatives=6)
    crd.set_train_labels(labels)
    index = torch.tensor([0, 4, 9, 11, 3])
    negatives = crd.draw_negatives(index, labels[index])
    assert negatives.shape == (5, 6) and negatives.dtype == torch.long  # K per sample
    for row, own in zip(negatives, index.tolist()):
        assert (labels[row] != labels[own]).all(), "a negative of the sample's own class"
        assert len(set(row.tolist())) == 6, "a repeat within one sample's draw from a large enough pool"


def test_crd_negatives_cover_the_other_classes_uniformly():
    crd = build("crd", context(n=20), num_negatives=5)  # class c holds 4 samples; 16 in each pool
    torch.manual_seed(3)
    index = torch.tensor([2] * 2000)  # class 2
    negatives = crd.draw_negatives(index, index % 5)
    counts = torch.bincount(negatives.flatten(), minlength=20)
    own = labels_of(20) == 2
    assert counts[own].sum() == 0
    expected = 2000 * 5 / 16
    assert (counts[~own] > 0.9 * expected).all() and (counts[~own] < 1.1 * expected).all()
    assert all(len(set(row.tolist())) == 5 for row in negatives)


def test_crd_negatives_repeat_only_when_the_other_classes_hold_fewer_than_k():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])  # class 0's pool: 3 samples; class 2's: 8
    crd = build_loss("crd", LossContext(STUDENT, TEACHER, num_classes=3, num_train_samples=9), num_negatives=5)
    crd.set_train_labels(labels)
    torch.manual_seed(4)
    index = torch.tensor([0, 8, 2, 8])
    negatives = crd.draw_negatives(index, labels[index])
    for row, own in zip(negatives, index.tolist()):
        assert (labels[row] != labels[own]).all()
    small = torch.cat([negatives[0], negatives[2]])
    assert set(small.tolist()) == {6, 7, 8}  # with replacement over the 3 others: all of them come up
    assert len(set(negatives[1].tolist())) == 5 and len(set(negatives[3].tolist())) == 5  # 8 >= 5: no repeat


def test_crd_negatives_follow_the_seed_or_a_generator():
    crd = build("crd", context(n=100), num_negatives=64)
    index = torch.tensor([5, 6])
    torch.manual_seed(1)
    a = crd.draw_negatives(index, index % 5)
    torch.manual_seed(1)
    assert torch.equal(crd.draw_negatives(index, index % 5), a)
    torch.manual_seed(2)
    assert not torch.equal(crd.draw_negatives(index, index % 5), a)
    crd.generator = torch.Generator().manual_seed(9)
    b = crd.draw_negatives(index, index % 5)
    crd.generator = torch.Generator().manual_seed(9)
    assert torch.equal(crd.draw_negatives(index, index % 5), b)


def test_crd_negatives_by_distinct_draws_are_uniform_with_unequal_pools_and_redraws(monkeypatch):
    """Pools at least twice K take the first K distinct of uniform draws; a row whose draws hold
    fewer than K distinct values is drawn again (forced here by drawing only K values per row)."""
    from compressor.knowledge import crd as crd_module

    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 5 + [3] * 3)  # pools of 38, 43 and 45 samples
    pools = crd_module.ClassPools(labels, num_classes=4)
    classes = torch.tensor([1, 2, 3] * 1500)
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(crd_module, "_draws_needed", lambda pool, n, k: k)
        torch.manual_seed(5)
        negatives = pools.draw_other_classes(classes, 8)
        assert negatives.shape == (4500, 8)
        for c in (1, 2, 3):
            rows = negatives[classes == c]
            assert (labels[rows] != c).all()
            assert all(len(set(row)) == 8 for row in rows.tolist())
            counts = torch.bincount(rows.flatten(), minlength=48)[labels != c].float()
            expected = 1500 * 8 / int((labels != c).sum())  # about 280; its sd about 16
            assert (counts > 0.8 * expected).all() and (counts < 1.2 * expected).all()


def test_crd_negatives_mix_the_three_ways_of_drawing_in_one_batch():
    from compressor.knowledge.crd import ClassPools

    # K = 10: class 0's pool (9) is below K: with replacement; class 1's (19) is under 2K: the K
    # largest of one key each; class 2's (22) is 2K or more: the first K distinct of uniform draws
    labels = torch.tensor([0] * 16 + [1] * 6 + [2] * 3)
    pools = ClassPools(labels, num_classes=3)
    torch.manual_seed(6)
    classes = torch.tensor([0, 1, 2, 1] * 50)
    negatives = pools.draw_other_classes(classes, 10)
    assert negatives.shape == (200, 10)
    for row, c in zip(negatives.tolist(), classes.tolist()):
        assert all(labels[i] != c for i in row)
        assert c == 0 or len(set(row)) == 10
    assert set(negatives[classes == 0].flatten().tolist()) == set(range(16, 25))  # all 9 come up


def test_crd_class_pools_are_compact():
    from compressor.knowledge.crd import ClassPools

    labels = torch.tensor([2, 0, 1, 0, 2, 2])
    pools = ClassPools(labels, num_classes=4)
    assert pools.order.tolist() == [1, 3, 2, 0, 4, 5]  # indices by class, stable
    assert pools.offsets.tolist() == [0, 2, 3, 6, 6]  # class 3 is empty
    assert pools.order.numel() == labels.numel() and pools.offsets.numel() == 5


def test_crd_memory_bytes_per_sample():
    crd = build("crd", context(n=50))
    assert crd.memory_bytes_per_sample == 512  # 2 banks x 128 dims x 2 bytes (float16)
    assert crd.memory_student.nbytes + crd.memory_teacher.nbytes == 512 * 50
    assert crd.memory_student.dtype == torch.float16 and crd.memory_student.shape == (50, 128)
    wide = build("crd", context(n=50), feat_dim=64, memory_dtype="float32")
    assert wide.memory_bytes_per_sample == 2 * 64 * 4
    assert wide.memory_student.nbytes + wide.memory_teacher.nbytes == 512 * 50


def test_crd_state_dict_round_trips_banks_and_resumes_exactly():
    torch.manual_seed(0)
    crd = build("crd", context(n=24), num_negatives=30)
    for step in range(3):
        crd(outputs(STUDENT, 4, seed=step), outputs(TEACHER, 4, seed=50 + step), batch_of([step, 5 + step, 10, 20]))
    buffer = io.BytesIO()
    torch.save(crd.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"memory_student", "memory_teacher", "log_z"} <= set(state)
    assert not any(k.startswith("memory") for k, _ in crd.named_parameters())

    torch.manual_seed(123)  # a differently initialised copy
    resumed = build("crd", context(n=24), num_negatives=30)
    resumed.load_state_dict(state)
    for key, value in crd.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    s, t, batch = outputs(STUDENT, 4, seed=7), outputs(TEACHER, 4, seed=8), batch_of([1, 2, 3, 4])
    torch.manual_seed(5)
    expected = crd(s, t, batch)
    torch.manual_seed(5)
    assert resumed(s, t, batch).item() == expected.item()
    assert torch.equal(resumed.memory_student, crd.memory_student)


def test_crd_user_errors():
    with pytest.raises(UserError, match="at least 2 training samples"):
        build("crd", context(n=1))
    with pytest.raises(UserError, match="memory_dtype"):
        build("crd", context(n=10), memory_dtype="int8")
    crd = build_loss("crd", context(n=4), num_negatives=5)
    with pytest.raises(RuntimeError, match="set_train_labels"):
        crd.draw_negatives(torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="4 training samples but 3 labels"):
        crd.set_train_labels(torch.tensor([0, 1, 2]))
    crd.set_train_labels(torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="one class"):
        crd.draw_negatives(torch.tensor([0, 1]), torch.tensor([0, 0]))


def crd_reference(crd, s: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, log_z: list[float],
                  mem_s: torch.Tensor, mem_t: torch.Tensor) -> torch.Tensor:
    """The authors' CRD loss in float64 with autograd (ContrastLoss on gathered memory rows),
    through ``crd``'s heads; ``rows`` (b, 1 + K) is positive first."""
    n, k = crd.num_data, rows.shape[1] - 1
    total = 0.0
    for side, (head, emb, memory) in enumerate(((crd.embed_student, s, mem_t), (crd.embed_teacher, t, mem_s))):
        anchor = F.normalize(F.linear(emb.double(), head.linear.weight.double(), head.linear.bias.double()), dim=1)
        p = torch.exp(torch.einsum("bkd,bd->bk", memory.double()[rows], anchor) / crd.temperature) / math.exp(log_z[side])
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + k / n))
        log_d0 = torch.log((k / n) / (p[:, 1:] + k / n))
        total = total - (log_d1.sum() + log_d0.sum()) / rows.shape[0]
    return total


@pytest.mark.parametrize("dense", [True, False], ids=["whole-bank", "gathered-rows"])
def test_crd_gradients_match_reference_across_row_blocks(dense, monkeypatch):
    """The gradient comes with the value (scores and bank are not kept for the backward), and the
    CPU works on blocks of rows: 20 anchors cross blocks of 6 (NCE) and 3 (sampler) unevenly."""
    from compressor.knowledge import crd as crd_module

    monkeypatch.setattr(crd_module, "_SCORE_ROWS", 6)
    monkeypatch.setattr(crd_module, "_SAMPLER_ROWS", 3)
    torch.manual_seed(0)
    crd = build("crd", context(n=60), num_negatives=20)  # pools of 48 >= 2 K: distinct draws
    crd._dense = lambda b: dense
    index = torch.arange(0, 60, 3)
    batch = batch_of(index)
    for step in range(2):  # the second step: Z fixed, banks (and their float32 copies) updated
        s, t = outputs(STUDENT, 20, requires_grad=True, seed=30 + step), outputs(TEACHER, 20, seed=40 + step)
        state = torch.get_rng_state()
        mem_s, mem_t = crd.memory_student.clone(), crd.memory_teacher.clone()
        crd.zero_grad()
        value = crd(s, t, batch)
        value.backward()
        torch.set_rng_state(state)
        rows = torch.cat([index[:, None], crd.draw_negatives(index, index % 5)], dim=1)
        heads = {name: p.grad.clone() for name, p in crd.named_parameters()}
        ref_s = s.embedding.detach().double().requires_grad_(True)
        crd.zero_grad()
        ref = crd_reference(crd, ref_s, t.embedding, rows, crd.log_z.tolist(), mem_s, mem_t)
        ref.backward()
        assert value.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(s.embedding.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)
        for name, p in crd.named_parameters():
            assert torch.allclose(heads[name].double(), p.grad.double(), rtol=1e-4, atol=1e-7), name


def test_crd_sampler_draws_the_same_in_row_blocks(monkeypatch):
    from compressor.knowledge import crd as crd_module

    pools = crd_module.ClassPools(labels_of(60), num_classes=5)
    classes = torch.arange(20) % 5
    torch.manual_seed(8)
    whole = pools.draw_other_classes(classes, 20)
    monkeypatch.setattr(crd_module, "_SAMPLER_ROWS", 3)
    torch.manual_seed(8)
    assert torch.equal(pools.draw_other_classes(classes, 20), whole)  # one stream, row by row


def test_crd_sampler_with_draw_positions_past_int16():
    """More than 32767 draws per row: the first-draw table counts in int32."""
    from compressor.knowledge.crd import ClassPools, _draws_needed

    labels = torch.arange(100_000) % 5
    assert _draws_needed(80_000, 100_000, 30_000) > torch.iinfo(torch.int16).max
    torch.manual_seed(9)
    negatives = ClassPools(labels, num_classes=5).draw_other_classes(torch.tensor([0, 3]), 30_000)
    for row, c in zip(negatives, (0, 3)):
        assert (labels[row] != c).all() and row.unique().numel() == 30_000


@pytest.mark.parametrize("dense", [True, False], ids=["whole-bank", "gathered-rows"])
def test_crd_scratch_tensors_carry_nothing_between_steps(dense):
    """The working tensors kept between steps are written before they are read: garbage left in
    them changes neither the loss nor the banks."""
    built = []
    for _ in range(2):
        torch.manual_seed(0)
        crd = build("crd", context(n=60), num_negatives=20)
        crd._dense = lambda b: dense
        built.append(crd)
    results = []
    for i, crd in enumerate(built):
        torch.manual_seed(3)
        crd(outputs(STUDENT, 10, seed=1), outputs(TEACHER, 10, seed=2), batch_of(torch.arange(10) * 5))
        if i:
            for tensor in crd._scratch._tensors.values():
                tensor.fill_(True if tensor.dtype == torch.bool else 2 ** 14)
        s = outputs(STUDENT, 10, requires_grad=True, seed=4)
        value = crd(s, outputs(TEACHER, 10, seed=5), batch_of(torch.arange(10) * 6))
        value.backward()
        results.append((value.item(), s.embedding.grad, crd.memory_student.clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def test_crd_float32_copy_of_the_bank_follows_it():
    """The whole-bank product runs against a float32 copy in class order, updated with the bank;
    a bank written any other way (a loaded checkpoint) is copied again."""
    torch.manual_seed(0)
    crd = build("crd", context(n=40), num_negatives=12)
    for step in range(3):
        crd(outputs(STUDENT, 4, seed=step), outputs(TEACHER, 4, seed=9 + step), batch_of([step, 7, 7, 30 - step]))
    order = crd.pools.order
    for name in ("student", "teacher"):
        bank = getattr(crd, f"memory_{name}")
        assert torch.equal(crd._float32_bank(name), bank[order].float().t())
    torch.manual_seed(1)
    other = build("crd", context(n=40), num_negatives=12)
    crd.load_state_dict(other.state_dict())
    assert torch.equal(crd._float32_bank("student"), other.memory_student[order].float().t())
    s, t, batch = outputs(STUDENT, 4, seed=20), outputs(TEACHER, 4, seed=21), batch_of([1, 2, 3, 4])
    torch.manual_seed(2)
    expected = other(s, t, batch)
    torch.manual_seed(2)
    assert crd(s, t, batch).item() == expected.item()


# ---------------------------------------------------------------- method spec


@pytest.fixture
def toy_loss():
    """A throwaway registered loss, removed again afterwards."""
    name = "zz_toy"

    @register_loss(name, "response")
    class Toy(KnowledgeLoss):
        default_weight = 0.25

        def forward(self, student, teacher, batch):  # pragma: no cover - never called
            return student.logits.sum() * 0

    yield name
    del knowledge_base._LOSSES[name]


GOOD = [
    ("crd", [("crd", 0.8)], 1.0),
    ("sp+crd", [("sp", 3000.0), ("crd", 0.8)], 1.0),
    ("zz_toy+crd", [("zz_toy", 0.25), ("crd", 0.8)], 1.0),
    ("zz_toy:0.9,crd:0.8,ce:1.0", [("zz_toy", 0.9), ("crd", 0.8)], 1.0),
    ("zz_toy:0.9,crd:0.8,ce:0.1", [("zz_toy", 0.9), ("crd", 0.8)], 0.1),
    ("ce:0.5,pkt", [("pkt", 30000.0)], 0.5),
    ("zz_toy+crd:2", [("zz_toy", 0.25), ("crd", 2.0)], 1.0),
    (" RKD_DA : 1e-1 + sp ", [("rkd_da", 0.1), ("sp", 3000.0)], 1.0),
    ("rkd_d+ce", [("rkd_d", 1.0)], 1.0),
    ("crd:0", [("crd", 0.0)], 1.0),
    ("ce", [], 1.0),
    ("ce:0,crd", [("crd", 0.8)], 0.0),
]


@pytest.mark.parametrize("spec,terms,ce", GOOD)
def test_parse_good_specs(toy_loss, spec, terms, ce):
    parsed = parse_method_spec(spec)
    assert list(parsed.terms) == terms and parsed.ce_weight == ce
    assert parse_method(spec) == [*terms, ("ce", ce)]
    assert parse_method_spec(str(parsed)) == parsed  # the explicit form round-trips
    assert MethodSpec.parse(spec) == parsed


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("crd++sp", "empty term"),
    ("crd,", "empty term"),
    ("crd:", "weight '' of 'crd'"),
    ("crd:abc", "weight 'abc'"),
    ("crd:-0.5", "weight '-0.5'"),
    ("crd:nan", "weight 'nan'"),
    ("crd:inf", "weight 'inf'"),
    ("crd:0.8:1", "weight '0.8:1'"),
    ("crd=0.8", "not a method name"),
    ("0.8:crd", "not a method name"),
    ("crdd", "unknown distillation method 'crdd' \\(did you mean crd"),
    ("hintonx", "known: .*crd.*pkt.*sp.*ce"),
    ("crd+crd:0.5", "'crd' appears twice"),
    ("ce:1,ce:2", "'ce' appears twice"),
    ("CRD+crd", "'crd' appears twice"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_parse_bad_specs(spec, message):
    with pytest.raises(UserError, match=message) as info:
        parse_method(spec)
    assert "\n" not in str(info.value)
    if "weight" in message or "empty" in message or "name" in message:
        assert "accepted forms" in str(info.value)


REFERENCE_WEIGHTS = [
    # RepDistiller scripts/run_cifar_distill.sh: the KD row is -r 0.1 -a 0.9
    ("hinton", [("hinton", 0.9)], 0.1),
    # CRD+KD: -r 1 -a 1 -b 0.8; SemCKD's scripts run KD at -a 1 beside their term too
    ("hinton+crd", [("hinton", 1.0), ("crd", 0.8)], 1.0),
    ("crd+hinton", [("crd", 0.8), ("hinton", 1.0)], 1.0),
    ("hinton+semckd", [("hinton", 1.0), ("semckd", 400.0)], 1.0),
    ("hinton+sp+crd", [("hinton", 1.0), ("sp", 3000.0), ("crd", 0.8)], 1.0),
    # any other method alone: -a 0 -b W, CE at -r's default 1
    ("crd", [("crd", 0.8)], 1.0),
    # explicit weights win; what is not given keeps the combination's default
    ("hinton:0.9,ce:1.0", [("hinton", 0.9)], 1.0),
    ("hinton:0.5", [("hinton", 0.5)], 0.1),
    ("hinton+ce", [("hinton", 0.9)], 0.1),
    ("hinton:0.9+crd", [("hinton", 0.9), ("crd", 0.8)], 1.0),
    ("hinton+crd,ce:0.5", [("hinton", 1.0), ("crd", 0.8)], 0.5),
]


@pytest.mark.parametrize("spec,terms,ce", REFERENCE_WEIGHTS)
def test_hinton_weights_follow_repdistillers_scripts(spec, terms, ce):
    parsed = parse_method_spec(spec)
    assert list(parsed.terms) == terms and parsed.ce_weight == ce
    assert parse_method_spec(str(parsed)) == parsed


def test_readme_method_table_is_the_parsers():
    from pathlib import Path

    from compressor.knowledge.spec import method_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = method_table()
    assert table in readme, "README's method table is stale: paste compressor.knowledge.spec.method_table()"
    assert "| `hinton` | `hinton:0.9,ce:0.1` |" in table
    assert "| `hinton+crd` | `hinton:1,crd:0.8,ce:1` |" in table


def test_method_spec_str_is_explicit_and_exact():
    spec = MethodSpec((("crd", 0.8), ("sp", 3000.0), ("pkt", 1e-05)), ce_weight=0.1)
    assert str(spec) == "crd:0.8,sp:3000,pkt:1e-05,ce:0.1"
    assert parse_method_spec(str(spec)) == spec
    odd = MethodSpec((("crd", 1 / 3),), ce_weight=2 / 3)
    assert parse_method_spec(str(odd)) == odd  # bit-exact floats


def test_toy_loss_is_removed_after_its_test():
    assert "zz_toy" not in list_losses()


# DDP: two gloo processes, each with half of every global batch (the last step pads rank 1 with a
# sample rank 0 holds, as DistributedSampler does)
CRD_DDP_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
from tests.test_losses_relation import STUDENT, TEACHER, batch_of, build, context, outputs

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same heads and banks on both ranks, as DDP starts them
crd = build("crd", context(n=40), num_negatives=12)
torch.manual_seed(100 + rank)  # each rank draws its own negatives
for step, index in enumerate(eval(sys.argv[2])):
    s, t = outputs(STUDENT, 8, seed=2 * step), outputs(TEACHER, 8, seed=2 * step + 1)
    half = slice(4 * rank, 4 * rank + 4)
    mine = type(s)(s.logits[half], [f[half] for f in s.features], s.embedding[half])
    theirs = type(t)(t.logits[half], [f[half] for f in t.features], t.embedding[half])
    crd(mine, theirs, batch_of(index[half]))
torch.save({"student": crd.memory_student, "teacher": crd.memory_teacher, "log_z": crd.log_z},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_crd_banks_are_the_same_on_every_ddp_rank_and_match_one_process_on_the_global_batch(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    steps = [[0, 7, 13, 21, 2, 30, 38, 11], [5, 16, 27, 33, 9, 19, 24, 36], [1, 6, 12, 39, 3, 8, 4, 6]]
    script = tmp_path / "crd_ddp.py"
    script.write_text(CRD_DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), repr(steps)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for key in ("student", "teacher", "log_z"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # one process on the global batches (the padded duplicate written once, with its first row)
    torch.manual_seed(0)
    crd = build("crd", context(n=40), num_negatives=12)
    initial = crd.memory_student.clone()
    for step, index in enumerate(steps):
        s, t = outputs(STUDENT, 8, seed=2 * step), outputs(TEACHER, 8, seed=2 * step + 1)
        keep = [i for i, k in enumerate(index) if k not in index[:i]]
        v_s = crd.embed_student(s.embedding[keep]).detach()
        v_t = crd.embed_teacher(t.embedding[keep]).detach()
        crd._update_memory(torch.tensor(index)[keep], v_s, v_t)
    assert torch.allclose(ranks[0]["student"].float(), crd.memory_student.float(), atol=2e-3)
    assert torch.allclose(ranks[0]["teacher"].float(), crd.memory_teacher.float(), atol=2e-3)
    seen = sorted({k for index in steps for k in index})
    assert not torch.equal(ranks[0]["student"][seen], initial[seen])  # both ranks' rows were written
    assert (ranks[0]["student"][seen].float() - initial[seen].float()).abs().sum(1).min() > 0
