"""Online and self distillation: cohorts and their aggregators, ModReduce, OSAKD, KD metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs
from compressor.metrics import average_relative_improvement, kd_gain
from compressor.models import create
from compressor.schemes import SchemeRequest, build_scheme
from compressor.schemes.aggregators import build_aggregator, list_aggregators
from compressor.schemes.aggregators.attention import attention_features
from compressor.schemes.branching import NotBranchable, split_model
from compressor.schemes.osakd import OutputMemory, knn_soft_labels
from compressor.schemes.peers import CohortInfo, GroupOutputs

SHAPE = (1, 8, 8)
AGGREGATORS = ("dml", "one", "pcl", "attention", "fc", "wavg")


def _outputs(logits: list[torch.Tensor], dim: int = 4) -> GroupOutputs:
    n = logits[0].shape[0]
    peers = [ModelOutputs(z, [], torch.ones(n, dim) * (i + 1)) for i, z in enumerate(logits)]
    return GroupOutputs(peers, torch.zeros(n, *SHAPE))


def _info(peers: int = 3, classes: int = 4) -> CohortInfo:
    return CohortInfo(peers, classes, SHAPE, (4,) * peers, None)


# --- metrics ------------------------------------------------------------------------------


def test_kd_gain_and_ari_on_worked_examples():
    assert kd_gain(69.73, 67.54) == pytest.approx(2.19)  # the attention paper's ResNet-20, CIFAR-100
    # pair 1: the method gains 2 over vanilla, the new one adds 2 more (+100%); pair 2: adds 0.5 of 1 (+50%)
    assert average_relative_improvement([72.0, 74.5], [70.0, 74.0], [68.0, 73.0]) == pytest.approx(75.0)
    # losing half of the method's gain is -50%
    assert average_relative_improvement([69.0], [70.0], [68.0]) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="pair 0"):
        average_relative_improvement([71.0], [70.0], [70.0])
    with pytest.raises(ValueError, match="one accuracy per pair"):
        average_relative_improvement([71.0, 72.0], [70.0], [69.0])


# --- attention aggregator -----------------------------------------------------------------


def test_attention_features_weights_and_loss_by_hand():
    # one sample, 3 peers, 4 classes, ground truth class 2
    p = torch.tensor([[[1.0, 2.0, 3.0, 0.0],     # gt logit 3: beats every class
                       [4.0, 0.0, 1.0, 2.0],     # gt logit 1: beats only class 1
                       [0.0, 1.0, -1.0, 2.0]]])  # gt logit -1 < 0: GMP(P.G) = 0 (Eq. 8)
    y = torch.tensor([2])
    f1, f2, f3 = attention_features(p, y)
    # F1 = GMP(P.G); -z = F1 - P; F2 = mean ReLU(-z); F3 = mean ReLU(-z) / (-z + eps)
    # peer 0: -z = [2, 1, 0, 3];  peer 1: -z = [-3, 1, 0, -1];  peer 2: -z = [0, -1, 1, -2]
    assert f1.tolist() == [[3.0, 1.0, 0.0]]
    assert f2.tolist() == [[1.5, 0.25, 0.25]]
    assert torch.allclose(f3, torch.tensor([[0.75, 0.25, 0.25]]), atol=1e-6)

    agg = build_aggregator("attention", _info())
    assert agg.temperature == 3.0 and agg.kd_weight == 1.0  # tau = 3, lambda = 1
    with torch.no_grad():  # MLP(F) = ReLU(F): identity layers, no bias
        for layer in (agg.mlp[0], agg.mlp[2]):
            layer.weight.copy_(torch.eye(3))
            layer.bias.zero_()
    w = agg.weights(p, y)
    expected_w = torch.sigmoid(torch.tensor([[3 + 1.5 + 0.75, 1 + 0.25 + 0.25, 0 + 0.25 + 0.25]]))
    assert torch.allclose(w, expected_w, atol=1e-6)
    e = agg.combine(p, w)  # Eq. 2
    expected_e = (expected_w[0, :, None] * p[0]).sum(0) / expected_w.sum()
    assert torch.allclose(e[0], expected_e, atol=1e-6)

    out = agg(_outputs([p[:, i] for i in range(3)]), y)
    tau = 3.0
    ce_e = -F.log_softmax(expected_e, 0)[2]
    kl = sum((F.softmax(expected_e / tau, 0) * (F.log_softmax(expected_e / tau, 0)
                                               - F.log_softmax(p[0, i] / tau, 0))).sum() for i in range(3))
    assert out.losses["ensemble_ce"].item() == pytest.approx(ce_e.item(), abs=1e-5)
    assert out.losses["kd"].item() == pytest.approx(tau**2 * kl.item(), abs=1e-5)
    with pytest.raises(RuntimeError, match="labels"):
        agg.ensemble(_outputs([p[:, i] for i in range(3)]))


# --- weighted average ---------------------------------------------------------------------


def test_wavg_weights_stay_on_the_simplex():
    agg = build_aggregator("wavg", _info())
    opt = torch.optim.SGD(agg.parameters(), lr=50.0)  # huge steps: the raw parameters run far
    torch.manual_seed(0)
    for _ in range(20):
        logits = [torch.randn(8, 4) * s for s in (1.0, 3.0, 0.1)]
        loss = sum(agg(_outputs(logits), torch.randint(0, 4, (8,))).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        w = agg.weights
        assert torch.all(w >= 0) and torch.all(w <= 1) and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert agg.theta.abs().max() > 1.0  # it did move


# --- OSAKD --------------------------------------------------------------------------------


def test_osakd_soft_labels_on_a_hand_built_neighbourhood():
    # keys on a line; the query at 0 has, by distance, 0.1 (class 0), 0.2 (class 1), 0.3 (class 1),
    # 0.4 (class 2), then 5.0 (class 0) far away
    keys = torch.tensor([[0.1], [0.2], [0.3], [0.4], [5.0], [0.0]])
    labels = torch.tensor([0, 1, 1, 2, 0, 2])
    query = torch.tensor([[0.0]])
    excluded = torch.tensor([[False, False, False, False, False, True]])  # the last key is the sample itself
    q3 = knn_soft_labels(query, keys, labels, 3, 3, excluded)
    assert torch.allclose(q3, torch.tensor([[1 / 3, 2 / 3, 0.0]]))
    q4 = knn_soft_labels(query, keys, labels, 4, 3, excluded)
    assert q4.tolist() == [[0.25, 0.5, 0.25]]
    with_self = knn_soft_labels(query, keys, labels, 1, 3)  # not excluded: it is its own neighbour
    assert with_self.tolist() == [[0.0, 0.0, 1.0]]


def test_osakd_memory_is_a_ring_and_excludes_the_sample_itself():
    mem = OutputMemory(4, 2)
    mem.write(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]), torch.tensor([10, 11, 12]))
    mem.write(torch.tensor([[0.5, 0.5], [0.75, 0.25]]), torch.tensor([1, 0]), torch.tensor([13, 10]))
    assert mem.indices.tolist() == [10, 11, 12, 13]  # slot 0 (old sample 10) overwritten by its new output
    assert mem.outputs[0].tolist() == [0.75, 0.25] and int(mem.pointer) == 1

    scheme = build_scheme("osakd", SchemeRequest("resnet8", 3, SHAPE, 50, options={"k": 2, "alpha": 0.9}))
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    batch = Batch(torch.zeros(4, *SHAPE), torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 3]))
    target, usable = scheme.soft_labels(probs, batch)
    # the two nearest OTHER outputs of samples 0 and 1 are each other (class 0) and sample 2 (class 1)
    assert usable.all()
    assert target[0].tolist() == [0.5, 0.5, 0.0]
    assert target[1].tolist() == [0.5, 0.5, 0.0]


def test_osakd_distillation_term_has_no_gradient_through_its_soft_labels():
    torch.manual_seed(0)
    scheme = build_scheme("osakd", SchemeRequest("resnet8", 10, SHAPE, 64, options={"k": 4}))
    batch = Batch(torch.randn(16, *SHAPE), torch.arange(16) % 10, torch.arange(16))
    losses = scheme(batch)
    assert scheme.alpha == 0.9 and scheme.k == 4
    grads = torch.autograd.grad(losses["osakd"], list(scheme.model.parameters()))
    # the same term against constant targets, recomputed: identical gradients
    scheme.memory.indices.fill_(-1)
    scheme.memory.pointer.zero_()
    logits = scheme.model(batch.x)
    probs = torch.softmax(logits, 1)
    target, _ = scheme.soft_labels(probs.detach(), batch)
    ref = 0.1 * F.mse_loss(probs, target.clone())
    ref_grads = torch.autograd.grad(ref, list(scheme.model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))


# --- gradient isolation where the papers detach ------------------------------------------


def _leaf_logits(n: int = 6, peers: int = 3, classes: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, classes, generator=g).requires_grad_() for _ in range(peers)]


def test_dml_targets_are_detached():
    logits = _leaf_logits()
    agg = build_aggregator("dml", _info())
    loss = agg(_outputs(logits), torch.zeros(6, dtype=torch.long)).losses["mutual"]
    grads = torch.autograd.grad(loss, logits)
    for i, z in enumerate(logits):
        others = torch.stack([torch.softmax(o.detach(), 1) for j, o in enumerate(logits) if j != i]).mean(0)
        expected = (torch.softmax(z.detach(), 1) - others) / z.shape[0]  # d/dz KL(q || softmax z), q constant
        assert torch.allclose(grads[i], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["fc", "wavg", "attention"])
def test_peers_mimic_a_detached_ensemble(name):
    agg = build_aggregator(name, _info())
    logits = _leaf_logits()
    out = agg(_outputs(logits), torch.tensor([0, 1, 2, 3, 0, 1]))
    params = [p for p in agg.parameters()]
    kd_grads = torch.autograd.grad(out.losses["kd"], params, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in kd_grads)  # KD never trains the ensemble
    ce_name = "weights_ce" if name == "wavg" else "ensemble_ce"
    ce_grads = torch.autograd.grad(out.losses[ce_name], params, allow_unused=True, retain_graph=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in ce_grads)  # its own CE does
    peer_grads = torch.autograd.grad(out.losses[ce_name], logits, allow_unused=True)
    if name == "wavg":  # the weights are rated on the students' performance, the students untouched
        assert all(g is None for g in peer_grads)
    else:
        assert any(g is not None for g in peer_grads)


def test_one_teacher_is_detached_and_its_gate_learns_from_its_ce():
    scheme = build_scheme("cohort", SchemeRequest("resnet8", 10, SHAPE, 64, options={"aggregator": "one"}))
    agg = scheme.aggregator
    out = scheme.group(torch.randn(8, *SHAPE))
    res = agg(out, torch.arange(8))
    gate = [agg.gate_fc.weight, agg.gate_bn.weight]
    assert all(g is None for g in torch.autograd.grad(res.losses["kd"], gate, allow_unused=True))
    assert all(torch.count_nonzero(g) > 0 for g in torch.autograd.grad(res.losses["ensemble_ce"], gate))
    assert agg.temperature == 3.0


def test_pcl_mean_teachers_get_no_gradient_and_follow_by_ema():
    torch.manual_seed(0)
    scheme = build_scheme("cohort", SchemeRequest("resnet8", 10, SHAPE, 64, options={"aggregator": "pcl"}))
    agg = scheme.aggregator
    mean = agg.mean_group
    assert all(not p.requires_grad for p in mean.parameters())
    assert mean in scheme.frozen_modules()
    batch = Batch(torch.randn(8, *SHAPE), torch.arange(8) % 10, torch.arange(8))
    losses = scheme(batch)
    classifier = [agg.classifier.weight]
    assert all(g is None for g in torch.autograd.grad(losses["pcl_peer_ensemble"], classifier, allow_unused=True))
    opt = torch.optim.SGD(scheme.trainable_parameters(), lr=0.1)
    before = [p.clone() for p in mean.parameters()]
    sum(losses.values()).backward()
    assert all(p.grad is None for p in mean.parameters())
    opt.step()
    agg.ema_decay = 0.5
    agg.ema_steps.fill_(10)  # past the warm-up: decay 0.5
    scheme.after_step()
    live = list(scheme.group.parameters())
    for m, b, l in zip(mean.parameters(), before, live):
        assert torch.allclose(m, 0.5 * b + 0.5 * l, atol=1e-6)


# --- branching ----------------------------------------------------------------------------


def test_branching_splits_at_the_last_stage_and_reassembles():
    model = create("resnet8", num_classes=10, in_chans=1).eval()
    split = split_model(model)
    x = torch.randn(3, *SHAPE)
    assert torch.allclose(split.head(split.trunk(x)), model(x), atol=1e-6)
    assert {k.split(".")[0] for k in split.head.state_dict()} == {"layer3", "fc"}
    assert split.trunk_stage_names == ("layer1", "layer2")
    with pytest.raises(NotBranchable, match="cannot be branched"):
        split_model(create("vgg8", num_classes=10, in_chans=1), SHAPE)


# --- every scheme: trains on digits, deploys one plain student ----------------------------


@pytest.fixture(scope="module")
def digits_batches():
    from compressor.data import load_source

    source = load_source("digits")
    loader = source.loader("train", 32, shuffle=True, augment=False, seed=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 3:
            break
    return source, batches


def _scheme(kind: str, source, **options):
    kwargs = {}
    if kind == "modreduce":
        torch.manual_seed(1)
        kwargs["teacher"] = create("resnet8", num_classes=10, in_chans=1).eval()
        kwargs["batch_size"] = 32
    torch.manual_seed(0)
    request = SchemeRequest("resnet8", source.num_classes, tuple(source.input_shape), source.num_train,
                            options=options, **kwargs)
    return build_scheme(kind, request)


CASES = [("cohort", {"aggregator": a}) for a in AGGREGATORS] + [("osakd", {}), ("modreduce", {})]


@pytest.mark.parametrize("kind,options", CASES, ids=[o.get("aggregator", k) for k, o in CASES])
def test_every_scheme_lowers_its_loss_on_digits_and_deploys_one_plain_student(kind, options, digits_batches, tmp_path):
    source, batches = digits_batches
    scheme = _scheme(kind, source, **options).train()
    scheme.bind_train_labels(source.targets("train"))  # as fit does: ModReduce's CRD draws by class
    opt = torch.optim.SGD(scheme.trainable_parameters(), lr=0.02, momentum=0.9)
    first = None
    for step in range(6):
        batch = batches[step % len(batches)]
        loss = sum(scheme(batch).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheme.after_step()
    final = sum(scheme(batches[0]).values()).item()
    assert math.isfinite(final) and final < first

    plain = create("resnet8", num_classes=10, in_chans=1)
    candidates = [n for n in scheme.eval_models() if n not in ("ensemble", "aggregate")]
    from compressor.schemes.selection import PeerSelection

    if isinstance(scheme, PeerSelection):  # a cohort: the best candidate on validation deploys
        scheme.observe_validation({n: 50.0 + i for i, n in enumerate(candidates)})  # the last one is best
        assert scheme.chosen == candidates[-1]
    deployable = scheme.deployable()
    assert type(deployable) is type(plain)
    assert deployable.state_dict().keys() == plain.state_dict().keys()
    assert getattr(deployable, "kd_arch", None) == "resnet8"
    x = batches[0].x[:4]
    live = scheme.eval_models()[candidates[-1]].eval()
    deployable.eval()
    with torch.no_grad():
        assert torch.allclose(deployable(x), live(x), atol=1e-5)
    scheme.train()
    path = tmp_path / "student.onnx"
    torch.onnx.export(deployable, (x,), str(path), dynamo=False)
    assert path.stat().st_size > 1000


def test_observe_validation_keeps_the_best_seen_and_the_trainer_ranks_by_it():
    scheme = _scheme("cohort", type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})(),
                     aggregator="dml")
    assert scheme.chosen == "peer0"
    assert scheme.observe_validation({"peer0": 60.0, "peer1": 70.0, "peer2": 65.0, "ensemble": 99.0}) == "peer1"
    assert scheme.observe_validation({"peer0": 68.0, "peer1": 50.0, "peer2": 69.0}) == "peer1"  # best so far kept
    assert scheme.observe_validation({"peer0": 71.0, "peer1": 50.0, "peer2": 71.0}) == "peer0"  # ties: the first
    state = scheme.state_dict()
    assert int(state["chosen_index"]) == 0 and float(state["chosen_top1"]) == 71.0


def test_heterogeneous_cohort_deploys_the_chosen_architecture():
    src = type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})()
    scheme = _scheme("cohort", src, aggregator="attention", peers="resnet8,resnet14")
    batch = Batch(torch.randn(8, *SHAPE), torch.arange(8) % 10, torch.arange(8))
    assert set(scheme(batch)) == {"ce_peer0", "ce_peer1", "attention_ensemble_ce", "attention_kd"}
    assert scheme.deployable().kd_arch == "resnet8"
    scheme.observe_validation({"peer0": 80.0, "peer1": 90.0})
    assert scheme.deployable().kd_arch == "resnet14"


def test_a_rebuilt_cohort_loads_the_saved_state_exactly():
    src = type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})()
    a = _scheme("cohort", src, aggregator="pcl")
    batch = Batch(torch.randn(8, *SHAPE), torch.arange(8) % 10, torch.arange(8))
    opt = torch.optim.SGD(a.trainable_parameters(), lr=0.1)
    sum(a(batch).values()).backward()
    opt.step()
    a.after_step()
    a.observe_validation({"mean1": 70.0})
    torch.manual_seed(123)  # a different initialisation, then the saved state
    b = build_scheme("cohort", SchemeRequest("resnet8", 10, SHAPE, 64, options={"aggregator": "pcl"}))
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    with torch.no_grad():
        assert all(torch.equal(p.logits, q.logits) for p, q in zip(a.group(batch.x).peers, b.group(batch.x).peers))
        assert torch.equal(a.deployable()(batch.x), b.deployable()(batch.x)) and b.chosen == "mean1"


def test_modreduce_students_carry_the_papers_losses_weights_and_temperature():
    src = type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})()
    scheme = _scheme("modreduce", src)
    assert scheme.students.names == ["s1_hinton", "s2_semckd", "s3_crd"]
    assert [sorted(terms) for terms in scheme.offline] == [["hinton"], ["hinton", "semckd"], ["crd", "hinton"]]
    assert scheme.weights == [{"hinton": 1.0}, {"hinton": 1.0, "semckd": 400.0}, {"hinton": 1.0, "crd": 0.8}]
    assert all(terms["hinton"].temperature == 4.0 for terms in scheme.offline)
    assert scheme.aggregator.name == "wavg" and scheme.aggregator.temperature == 4.0
    assert scheme.frozen_modules()[0] is scheme.teacher and not any(p.requires_grad for p in scheme.teacher.parameters())
    with pytest.raises(UserError, match="give --teacher"):
        build_scheme("modreduce", SchemeRequest("resnet8", 10, SHAPE, 64))
    with pytest.raises(UserError, match="exactly 3 students"):
        _scheme("modreduce", src, peers="resnet8,resnet8")


# --- bad input ----------------------------------------------------------------------------


def test_bad_cohorts_and_aggregators_are_user_errors():
    src = type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})()
    with pytest.raises(UserError, match="at least 2 peers"):
        _scheme("cohort", src, cohort=1)
    with pytest.raises(UserError, match="unknown aggregator 'attn'.*attention"):
        _scheme("cohort", src, aggregator="attn")
    with pytest.raises(UserError, match="'one' needs a branchable network: vgg8 cannot be branched"):
        build_scheme("cohort", SchemeRequest("vgg8", 10, SHAPE, 64, options={"aggregator": "one"}))
    with pytest.raises(UserError, match="cannot mix"):
        _scheme("cohort", src, aggregator="pcl", peers="resnet8,resnet14")
    with pytest.raises(UserError, match=r"k=64 neighbours cannot come from a memory of 64"):
        _scheme("osakd", src, k=64)
    assert sorted(list_aggregators()) == sorted(AGGREGATORS)


@pytest.mark.parametrize("args,message", [
    (["--cohort", "1"], "at least 2 peers"),
    (["--cohort", "3", "--aggregator", "mean"], "unknown aggregator 'mean'"),
    (["--cohort", "2", "--aggregator", "one", "--student", "vgg8"], "cannot be branched"),
    (["--scheme", "osakd", "--k", "5000"], "k=5000 neighbours cannot come from a memory of"),
    (["--scheme", "osakd", "--k", "8", "--memory", "8"], "k=8 neighbours cannot come from a memory of 8"),
])
def test_cli_bad_online_input_is_one_line_and_exit_2(args, message, tmp_path, cli):
    argv = ["distill", "--data", "digits", "-o", str(tmp_path / "s.pt"), "--epochs", "1", "-q", *args]
    if "--student" not in args:
        argv += ["--student", "resnet8"]
    result = cli(*argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_cli_cohort_end_to_end_deploys_the_peer_chosen_on_validation(tmp_path, cli):
    import json

    from compressor.checkpoint import load_model

    out = tmp_path / "best.pt"
    result = cli("distill", "--cohort", "2", "--aggregator", "wavg", "--student", "resnet8", "--data", "digits",
                 "-o", str(out), "--epochs", "1", "--batch-size", "128", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "best.pt.run" / "stages" / "student" / "log.jsonl").read_text().splitlines()[-1])
    peers = {n: r["top1"] for n, r in record["val_models"].items() if n.startswith("peer")}
    assert record["val_chosen"] == max(peers, key=peers.get) and record["val_top1"] == max(peers.values())
    loaded = load_model(out)
    assert loaded.meta.arch == "resnet8" and type(loaded.model).__name__ == "CifarResNet"


def test_build_aggregator_names_a_bad_option_but_lets_a_bug_inside_a_constructor_through(monkeypatch):
    """Only a keyword the constructor does not take is the user's mistake; a TypeError raised
    inside the constructor is a bug and must keep its traceback."""
    from compressor.schemes.aggregators import base
    from compressor.schemes.aggregators.dml import DeepMutualLearning

    class Buggy(DeepMutualLearning):
        def __init__(self, info, temperature=None, kd_weight=1.0):
            super().__init__(info, temperature, kd_weight)
            len(None)  # a bug: TypeError from inside

    monkeypatch.setitem(base._AGGREGATORS, "buggy", Buggy)
    with pytest.raises(TypeError, match="NoneType"):
        build_aggregator("buggy", _info())
    with pytest.raises(UserError, match=r"aggregator 'dml' takes no option 'hidden'"):
        build_aggregator("dml", _info(), hidden=8)


def test_modreduce_refuses_a_method_it_cannot_take(tmp_path, cli):
    """Its three students' knowledge is fixed (Hinton; SemCKD + KD; CRD + KD): a method would be
    recorded in the plan and silently ignored, so it is refused, before anything is written."""
    src = type("S", (), {"num_classes": 10, "input_shape": SHAPE, "num_train": 64})()
    torch.manual_seed(1)
    teacher = create("resnet8", num_classes=10, in_chans=1).eval()
    with pytest.raises(UserError, match="modreduce.*--method"):
        build_scheme("modreduce", SchemeRequest("resnet8", 10, SHAPE, 64, teacher=teacher, method="hinton+crd",
                                                batch_size=32))
    assert _scheme("modreduce", src).students.names  # no method: the paper's three students
    from compressor.checkpoint import ModelMeta, save_model
    from compressor.data import load_source

    save_model(tmp_path / "t.pt", teacher, ModelMeta.from_source("resnet8", load_source("digits")))
    result = cli("distill", "--scheme", "modreduce", "--method", "hinton", "--student", "resnet8",
                 "--teacher", str(tmp_path / "t.pt"), "-o", str(tmp_path / "s.pt"), "--epochs", "1", "-q")
    assert result.exit_code == 2 and "--method" in result.output, result.output
    assert not (tmp_path / "s.pt.run").exists()


def test_modreduce_stage_trains_with_nesterov_sgd_unless_told_otherwise():
    """ModReduce App. A.3: the CRD benchmark's protocol with Nesterov momentum."""
    from recipes.distill_run import distill_request
    from recipes.planner import Facts, make_plan

    def plan(**train):
        return make_plan(distill_request(teacher="t.pt", student="resnet20", scheme="modreduce", **train),
                         Facts("cifar100:/nowhere", 100, (3, 32, 32)))

    train = plan().final.train
    assert train.nesterov is True and train.optimizer == "sgd" and train.momentum == 0.9
    assert (train.lr, train.epochs, train.milestones, train.batch_size) == (0.05, 240, (150, 180, 210), 64)
    assert plan(epochs=3).final.train.epochs == 3


def test_attention_cohort_preset_is_the_papers_protocol():
    """Sec. 4.1: N = 3, tau = 3, lambda = 1; Adam 1e-3, batch 32, 200 epochs, x0.1 at 80/140/170 and on
    a 5-epoch plateau."""
    from compressor.trainer import TrainConfig
    from recipes.planner import preset_plan
    from recipes.preset import load_preset
    from recipes.request import PlanRequest

    plan = preset_plan(load_preset("cifar100_attention_cohort_resnet20"), PlanRequest(), data=None)
    (stage,) = plan.stages
    config = stage.train
    assert isinstance(config, TrainConfig)
    assert (config.optimizer, config.lr, config.batch_size, config.epochs) == ("adam", 1e-3, 32, 200)
    assert (config.schedule, config.milestones, config.gamma) == ("step", (80, 140, 170), 0.1)
    assert (config.plateau_patience, config.plateau_factor) == (5, 0.1)
    scheme = build_scheme(stage.scheme, SchemeRequest("resnet8", 10, SHAPE, 64, options=dict(stage.options)))
    assert len(scheme.group) == 3 and scheme.aggregator.name == "attention"
    assert scheme.aggregator.temperature == 3.0 and scheme.aggregator.kd_weight == 1.0
