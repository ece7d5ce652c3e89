"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

The student's and teacher's embeddings of the same image are a positive pair, of different
images a negative pair; a critic learnt by noise-contrastive estimation (NCE) tells them apart,
which maximises a lower bound on the mutual information between the two representations.
Negatives come from two memory banks (one per side) holding a momentum average of every
training sample's projected embedding, keyed on the sample's index in the training split.

Negatives are RepDistiller's ``exact`` mode (dataset/cifar100.py, CIFAR100InstanceSample, the
default of train_student.py): for each sample, K = 16384 indices drawn from the training samples of
the OTHER classes, without replacement when that pool holds at least K samples and with
replacement only when it is smaller. The training labels arrive from the trainer
(:meth:`ContrastiveRepresentationDistillation.set_train_labels`) and are kept compactly, as
:class:`ClassPools`: the sample indices sorted by class (one int tensor) and the class offsets.
Draws run on the memory's device, vectorised over the batch. Where K is at most half the pool
(CIFAR-100: 16384 of 49500) a row is the first K new values of uniform draws over the samples
(about 0.41 x N draws), instead of a random key for every sample and a top-K over them: half the
sampler's time, the same distribution (a uniformly random K-subset of the other classes).

Memory: the banks are stored in float16 (unit vectors, so 11 significant bits are plenty), at
``2 banks x feat_dim x 2 bytes`` = 512 bytes per training sample with feat_dim = 128 (the
authors' float32 banks take 1024); the class pools add 16 bytes per sample. Scores are computed
in float32. Gathering each sample's K negative rows, as the authors do, takes b x K x feat_dim
values per side (for b = 64, K = 16384: 512 MiB in float32); where it is cheaper (N x (b +
feat_dim) < b x K x feat_dim, e.g. CIFAR's N = 50000) the anchors are scored against the whole
bank in one matrix product and the K scores picked from it, which gives the same numbers. That
product runs against a float32 copy of each bank, kept in step with it and laid out for the
product (:meth:`ContrastiveRepresentationDistillation._float32_bank`): 1024 more bytes per
training sample, held between steps rather than made afresh in each (a step's peak memory is
about the same either way), and only where the whole bank is scored.

Speed (measured on one CPU thread by benchmarks/distill_overhead.py): the loss's gradient w.r.t.
the anchors is computed with its value (:class:`_GradientWithValue`), so neither the scores nor
the bank are kept for the backward; the working tensors of b x N or b x K values are kept between
steps (:class:`Scratch`) instead of being faulted in afresh; the sampler and the NCE work on a
few rows at a time so that their passes find the rows in cache. Values and gradients are those
of scoring and NCE in one piece, to float32 rounding.

Under DDP each rank sees its own share of the batch, but the banks hold every training sample:
the update gathers (index, v_s, v_t) from all ranks first, so every rank writes the same rows and
holds the same bank, the one a single process would on the global batch (the data sources pad
like DistributedSampler, so the per-rank batches are of equal size, as ``all_gather`` needs; an
index padded onto two ranks is written once). Z is likewise estimated on the global first batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.features import ModelOutputs
from compressor.knowledge._relational import full_precision
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ProjectionHead(nn.Module):
    """g(.) of the paper: a linear map to ``feat_dim`` followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


class Scratch:
    """Named scratch tensors kept from one step to the next.

    CRD's step works through a few tensors of b x N or b x K values (tens of MiB on CIFAR); a
    fresh allocation of that size comes from the OS as untouched pages, and faulting them in
    cost about as much CPU time as the arithmetic on them. Kept here they are allocated once
    (again only when a shape changes, e.g. on a smaller last batch): the memory the step
    needed at its peak anyway, held between steps. A tensor from it is valid until the next
    ``get`` of its name.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        tensor = self._tensors.get(name)
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
            self._tensors.pop(name, None)  # free the old one before the new one is allocated
            tensor = self._tensors[name] = torch.empty(shape, dtype=dtype, device=device)
        return tensor


def _scratch(scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> Tensor:
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.get(name, shape, dtype, device)


def nce(scores: Tensor, log_z: Tensor, num_data: int, temperature: float, with_grad: bool = False,
        batch_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """NCE loss for one anchor side, and its gradient w.r.t. ``scores`` if ``with_grad``.

    Column 0 of ``scores`` (b, 1 + K) is the positive. With P = exp(s / tau) / Z (the critic's
    un-normalised probability, Z estimated once) and the uniform noise distribution P_n = 1 / N,
    the critic h = P / (P + K P_n) and the loss is -E[log h(positive)] - K E[log(1 -
    h(negative))] (Tian et al., Eq. 18 of the arXiv version, ContrastLoss in the authors' code),
    summed over the batch's negatives and divided by b. Written with softplus so that nothing
    overflows: -log h = softplus(c - s / tau) and -log(1 - h) = softplus(s / tau - c), c = log Z
    + log(K P_n); both in one pass over the scores, ``s * (-+1 / tau) +- c`` by column. The
    gradient is sigmoid of the same arguments times ``-+1 / (tau b)``.

    ``scores`` is overwritten (it is the largest tensor here, and the caller is done with it).
    ``batch_size`` (default: its rows) is b, where ``scores`` holds a slice of the batch's rows.
    """
    b, k = batch_size or scores.shape[0], scores.shape[1] - 1
    shift = log_z + math.log(k / num_data)
    sign = torch.ones(k + 1, dtype=scores.dtype, device=scores.device)
    sign[0] = -1.0
    x = torch.addcmul(-shift * sign, scores, sign / temperature, out=scores)
    value = F.softplus(x).sum() / b
    if not with_grad:
        return value, None
    return value, torch.sigmoid(x, out=x).mul_(sign / (temperature * b))


class _GradientWithValue(torch.autograd.Function):
    """``compute(x) -> (value, d value / d x)``: a value whose gradient came with it.

    CRD's loss is a sum over b x (1 + K) scores; its gradient w.r.t. the anchors is cheapest
    while the scores and the bank are at hand, and then none of them (hundreds of MiB where
    rows are gathered) is kept for the backward, which only scales the (b, D) gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, compute: Callable[[Tensor], tuple[Tensor, Tensor | None]]) -> Tensor:
        value, grad = compute(x)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor | None, None]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_value), None


class ClassPools:
    """Training-sample indices grouped by class: ``order`` (indices sorted by class, stable) and
    ``offsets`` (class c holds ``order[offsets[c]:offsets[c + 1]]``); 8 bytes per sample, 8 more
    for the inverse of ``order`` once it is used (:meth:`positions_of`)."""

    def __init__(self, labels: Tensor, num_classes: int | None = None) -> None:
        labels = labels.detach().long().flatten()
        if labels.numel() and int(labels.min()) < 0:
            raise UserError("crd: the training labels must be class indices >= 0")
        classes = max(int(num_classes or 0), int(labels.max()) + 1 if labels.numel() else 0)
        counts = torch.bincount(labels.cpu(), minlength=classes).to(labels.device)
        self.order = torch.argsort(labels, stable=True)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.num_samples = labels.numel()
        self._rank: Tensor | None = None  # positions_of

    def to(self, device: torch.device) -> "ClassPools":
        self.order, self.offsets = self.order.to(device), self.offsets.to(device)
        if self._rank is not None:
            self._rank = self._rank.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.order.device

    def positions_of(self, index: Tensor) -> Tensor:
        """The position in ``order`` of each sample index (the inverse permutation, made on first use)."""
        if self._rank is None:
            self._rank = torch.empty_like(self.order)
            self._rank[self.order] = torch.arange(self.num_samples, device=self.device)
        return self._rank[index]

    def draw_other_classes(self, classes: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """(b, k) sample indices, row r from the samples whose class is not ``classes[r]``.

        Without replacement where that pool holds at least k samples (a uniformly random
        k-subset), with replacement where it is smaller (RepDistiller's ``replace = k >
        len(cls_negative[target])``). How a k-subset is drawn depends on how much of the pool it
        takes (:func:`_distinct_draws`, :func:`_smallest_keys`).
        """
        return self.order[self.draw_positions(classes, k, generator)[:, 1:]]

    def draw_positions(self, classes: Tensor, k: int, generator: torch.Generator | None = None,
                       scratch: Scratch | None = None) -> Tensor:
        """The draws of :meth:`draw_other_classes` as positions in ``order``, in columns 1..k of a
        (b, 1 + k) tensor whose column 0 is unspecified (CRD writes the positive there, so no copy
        joins them); possibly a view with a row stride above 1 + k. With ``scratch`` it lives
        there, valid until the next draw with that scratch."""
        classes = classes.to(self.device).long()
        b, n = classes.shape[0], self.num_samples
        start, stop = self.offsets[classes], self.offsets[classes + 1]
        pool = n - (stop - start)  # (b,) size of each row's other-class pool
        if bool((pool < 1).any()):
            raise UserError("crd: every training sample is of one class, so there is no negative to draw")
        small = pool < k
        sparse = ~small & (pool >= _SPARSE * k)
        groups = [(small, _with_replacement), (sparse, _distinct_draws), (~small & ~sparse, _smallest_keys)]
        whole = [draw for rows, draw in groups if bool(rows.all())]
        if whole:  # the usual case (balanced classes): one way for the whole batch, no scatter
            return whole[0](start, stop, n, k, generator, scratch)
        position = torch.empty(b, 1 + k, dtype=torch.long, device=self.device)
        for rows, draw in groups:
            rows = rows.nonzero().flatten()
            if rows.numel():
                position[rows] = draw(start[rows], stop[rows], n, k, generator, None)
        return position


# a pool at least this many times k is drawn by distinct draws, a smaller one by k smallest keys
_SPARSE = 2
# draws enough that fewer than k distinct values is this many standard deviations below the mean
_MARGIN_SDS = 8.0

# The ways of drawing below take each row's own class [start, stop) in `order` (sorted by class),
# the number of samples n and k, and return (r, 1 + k) positions: each row's k in columns 1..k,
# column 0 unspecified (draw_positions).


def _with_replacement(start: Tensor, stop: Tensor, n: int, k: int, generator: torch.Generator | None,
                      scratch: Scratch | None = None) -> Tensor:
    """Uniform draws, with replacement, from ``[0, n)`` less each row's ``[start, stop)``."""
    width = stop - start
    pool = n - width
    if bool((pool == pool[0]).all()):  # one pool size: exact integers
        draw = torch.randint(0, int(pool[0]), (pool.numel(), k), generator=generator, device=pool.device)
    else:  # float64 keeps the rounding bias of scaling below 2^-53 * pool
        draw = torch.rand(pool.numel(), k, dtype=torch.float64, generator=generator, device=pool.device)
        draw = torch.minimum((draw * pool[:, None]).long(), pool[:, None] - 1)
    # pool positions below the own class keep their place in `order`, the others move past it
    return _after_free_column(draw + (draw >= start[:, None]) * width[:, None])


def _smallest_keys(start: Tensor, stop: Tensor, n: int, k: int, generator: torch.Generator | None,
                   scratch: Scratch | None = None) -> Tensor:
    """A uniform k-subset of each row's pool: the k largest of one uniform key per pool member.

    Touches every sample (a key each and a top-k); used where k is a large part of the pool.
    """
    keys = torch.rand(start.numel(), n, device=start.device, generator=generator)
    position = torch.arange(n, device=start.device)
    own = (position >= start[:, None]) & (position < stop[:, None])
    keys.masked_fill_(own, -1.0)  # keys are in [0, 1): the own class is never among the top k
    return _after_free_column(keys.topk(k, dim=1, sorted=False).indices)


def _after_free_column(position: Tensor) -> Tensor:
    """(r, k) -> (r, 1 + k) with a zero column 0."""
    return torch.cat([position.new_zeros(position.shape[0], 1), position], dim=1)
def _distinct_draws(start: Tensor, stop: Tensor, n: int, k: int, generator: torch.Generator | None,
                    scratch: Scratch | None = None) -> Tensor:
    """A uniform k-subset of each row's pool: the first k new values of uniform draws.

    Draws are uniform over all n positions; one is new if no earlier draw of the row took it
    and it is not of the row's own class. Drawing with replacement and skipping what is not
    new is sequential sampling without replacement from the pool, so the first k new values are
    a uniform k-subset. Where k is at most half the pool this takes about
    ``-n * ln(1 - k / pool)`` draws (0.41 x n for CIFAR-100's 16384 of 49500), instead of a key
    for every sample and a top-k over them. The draws are sized so that fewer than k new
    values is ``_MARGIN_SDS`` standard deviations away; a row that still falls short is drawn
    again from scratch, which leaves the subset uniform (falling short does not depend on
    which values came).
    """
    r, device = start.numel(), start.device
    width = stop - start
    count = _draws_needed(n - int(width.max()), n, k)
    # int16 on the CPU where the draw positions fit: a quarter of int64's memory traffic
    small = device.type == "cpu" and count < torch.iinfo(torch.int16).max
    dtype = torch.int16 if small else torch.int32
    spread = _scratch(scratch, "spread", (r, count + 1), torch.long, device)
    enough = torch.empty(r, dtype=torch.bool, device=device)
    # a few rows at a time on the CPU, so that each pass over them finds them in cache; the
    # draws come in the same order as in one piece (row by row from one stream)
    rows = _SAMPLER_ROWS if device.type == "cpu" else r
    for lo in range(0, r, rows):
        hi = min(lo + rows, r)
        enough[lo:hi] = _first_new(start[lo:hi], stop[lo:hi], n, k, count, dtype, generator, spread[lo:hi],
                                   rows, scratch)
    out = spread[:, : 1 + k]  # the first k new values; a view: no copy
    if not bool(enough.all()):
        short = (~enough).nonzero().flatten()
        out[short] = _distinct_draws(start[short], stop[short], n, k, generator)
    return out


# rows of the batch the CPU sampler works on at a time (8 rows: about 2 MiB of working tensors)
_SAMPLER_ROWS = 8
# anchors the CPU NCE works on at a time between the two products with the bank
_SCORE_ROWS = 16


def _first_new(start: Tensor, stop: Tensor, n: int, k: int, count: int, dtype: torch.dtype,
               generator: torch.Generator | None, spread: Tensor, capacity: int, scratch: Scratch | None) -> Tensor:
    """``count`` uniform draws per row; the j-th new one into ``spread[:, j]`` (j = 1..), every
    other draw into column 0. Returns whether each row had at least k new values. Working
    tensors come from ``scratch`` sized for ``capacity`` rows (the same each call)."""
    r, device = start.numel(), start.device

    def work(name: str, columns: int, kind: torch.dtype) -> Tensor:
        return _scratch(scratch, name, (capacity, columns), kind, device)[:r]

    draws = work("draws", count, torch.long).random_(0, n, generator=generator)
    # the first draw position of every value; -1 for the own class (never new); column n: unused
    first_at = work("first_at", n + 1, dtype).fill_(count)
    width = stop - start
    widest = int(width.max())
    if widest:
        own = start[:, None] + torch.arange(widest, device=device)
        own = torch.where(own < stop[:, None], own, n)  # past a row's own class: the unused column
        first_at.scatter_(1, own, -1)
    place = torch.arange(count, dtype=dtype, device=device).expand(r, count)
    first_at.scatter_reduce_(1, draws, place, "amin")
    first = torch.gather(first_at, 1, draws, out=work("first", count, dtype))
    new = torch.eq(first, place, out=first)  # 1 where a draw is new
    column = torch.cumsum(new, 1, dtype=dtype, out=work("column", count, dtype))
    enough = column[:, -1] >= k
    spread.scatter_(1, torch.mul(column, new, out=work("column64", count, torch.long)), draws)
    return enough


@functools.lru_cache(maxsize=64)
def _draws_needed(pool: int, n: int, k: int) -> int:
    """Uniform draws from n values after which at least k of a ``pool``-sized subset of them have
    come up, but for a ``_MARGIN_SDS``-sigma shortfall. With ``q1 = (1 - 1/n)^d`` and
    ``q2 = (1 - 2/n)^d`` after d draws, the count of the pool's values not yet drawn has mean
    ``pool * q1`` and variance ``pool * q1 + pool (pool - 1) q2 - pool^2 q1^2`` (occupancy)."""

    def enough(draws: int) -> bool:
        q1 = math.exp(draws * math.log1p(-1.0 / n))
        q2 = math.exp(draws * math.log1p(-2.0 / n)) if n > 2 else 0.0
        var = pool * q1 + pool * (pool - 1) * q2 - pool * pool * q1 * q1
        return pool * (1 - q1) - _MARGIN_SDS * math.sqrt(max(var, 0.0)) >= k

    low, high = k, 2 * k
    while not enough(high):
        low, high = high, 2 * high
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid + 1, high)
    return high


@register_loss("crd", "relation")
class ContrastiveRepresentationDistillation(KnowledgeLoss):
    """L_CRD = NCE(student anchor, teacher memory) + NCE(teacher anchor, student memory).

    Tian et al., Sec. 3.2-3.4 and the authors' code (RepDistiller crd/): both embeddings go
    through a linear head to ``feat_dim`` and are L2-normalised; the critic is
    exp(g_T(t)' g_S(s) / tau) / Z with tau = 0.07 and Z = N * mean(exp(score / tau)) fixed on the
    first batch; K = 16384 negatives per sample drawn from the training samples of the other
    classes (``exact`` mode, see the module docstring); after each training forward the banks
    move to normalise(m * old + (1 - m) * new) at the batch's indices, m = 0.5. Weight 0.8 is
    the paper's CIFAR-100 setting (RepDistiller ``-b 0.8``).

    The heads are trained with the student (the teacher's head too: it is part of the critic).
    The banks and Z are buffers, so a checkpoint resumes exactly; nothing is updated in eval
    mode, so a validation pass cannot write another split's samples into the training memory.
    The class pools are not saved: the trainer binds them from the data source on every run.
    """

    default_weight: ClassVar[float] = 0.8

    def __init__(
        self,
        ctx: LossContext,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        memory_dtype: str = "float16",
    ) -> None:
        super().__init__(ctx)
        n = ctx.num_train_samples
        if n < 2:
            raise UserError(f"crd needs at least 2 training samples to draw negatives from, got {n}")
        if num_negatives < 1:
            raise UserError(f"crd: num_negatives must be at least 1, got {num_negatives}")
        if memory_dtype not in _DTYPES:
            raise UserError(f"crd: memory_dtype must be one of {', '.join(_DTYPES)}, got {memory_dtype!r}")
        self.num_data = n
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        # None: the global RNG of the memory's device, so the trainer's seeding fixes the draws
        self.generator: torch.Generator | None = None
        self.pools: ClassPools | None = None  # set_train_labels
        self.embed_student = ProjectionHead(ctx.student.embedding_dim, feat_dim)
        self.embed_teacher = ProjectionHead(ctx.teacher.embedding_dim, feat_dim)
        dtype = _DTYPES[memory_dtype]
        bound = 1.0 / math.sqrt(feat_dim / 3)  # the authors' initialisation: uniform in +-bound
        self.register_buffer("memory_student", (torch.rand(n, feat_dim) * 2 - 1).mul_(bound).to(dtype))
        self.register_buffer("memory_teacher", (torch.rand(n, feat_dim) * 2 - 1).mul_(bound).to(dtype))
        # log Z for [student-anchor scores, teacher-anchor scores]; NaN until the first batch
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self._log_z_known = False  # saves a device sync per step once Z is set (or loaded)
        # float32 class-ordered copies of the banks for scoring the whole bank (_float32_bank):
        # name -> (copy, the bank's version, the class pools it is ordered by)
        self._float32_banks: dict[str, tuple[Tensor, int, ClassPools]] = {}
        self._scratch = Scratch()

    @property
    def memory_bytes_per_sample(self) -> int:
        """Bytes the two banks hold per training sample (the float32 scoring copies aside, see
        :meth:`_float32_bank`)."""
        return 2 * self.feat_dim * self.memory_student.element_size()

    def set_train_labels(self, labels: Tensor) -> None:
        labels = torch.as_tensor(labels)
        if labels.numel() != self.num_data:
            raise UserError(f"crd: the memory holds {self.num_data} training samples but {labels.numel()} labels came")
        self.pools = ClassPools(labels, self.ctx.num_classes).to(self.memory_student.device)

    def _class_pools(self) -> ClassPools:
        if self.pools is None:
            raise RuntimeError("crd draws negatives from the other classes and needs the training labels: "
                               "call set_train_labels() first (the trainer does, from the data source)")
        device = self.memory_student.device
        if self.pools.device != device:
            self.pools.to(device)
        return self.pools

    def draw_negatives(self, index: Tensor, labels: Tensor) -> Tensor:
        """(b, K) sample indices: for row r, K draws among the samples of classes other than labels[r]
        (the forward's draws, for the same random state)."""
        return self._class_pools().draw_other_classes(labels.to(self.memory_student.device), self.num_negatives,
                                                      self.generator)

    def _dense(self, batch_size: int) -> bool:
        """Score against the whole bank when that takes fewer values than gathering b x K rows."""
        return self.num_data * (batch_size + self.feat_dim) < batch_size * self.num_negatives * self.feat_dim

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        pools, device = self._class_pools(), self.memory_student.device
        index = batch.index.to(device).long()
        dense = self._dense(index.numel())
        # (b, 1 + K) rows: the positive, then the negatives (as draw_negatives draws them); as
        # positions in the class order where the whole bank is scored (its float32 copies are in
        # that order), as sample indices where rows of the banks are gathered
        rows = pools.draw_positions(batch.y.to(device), self.num_negatives, self.generator, self._scratch)
        rows[:, 0] = pools.positions_of(index)
        if not dense:
            rows = pools.order[rows]
        with full_precision(student.embedding.device):
            v_s = self.embed_student(student.embedding.float())
            v_t = self.embed_teacher(teacher.embedding.detach().float())
            loss = self._side(v_s, "teacher", rows, 0, dense) + self._side(v_t, "student", rows, 1, dense)
        self._log_z_known = True
        if self.training:
            self._update_memory(index, v_s, v_t)
        return loss

    def _side(self, anchor: Tensor, bank: str, rows: Tensor, side: int, dense: bool) -> Tensor:
        """NCE of ``anchor`` against ``memory_<bank>`` at ``rows``; log Z is ``log_z[side]``."""
        with_grad = torch.is_grad_enabled() and anchor.requires_grad
        compute = functools.partial(self._nce_side, bank=bank, rows=rows, side=side, dense=dense, with_grad=with_grad)
        return _GradientWithValue.apply(anchor, compute)

    def _nce_side(self, anchor: Tensor, *, bank: str, rows: Tensor, side: int, dense: bool,
                  with_grad: bool) -> tuple[Tensor, Tensor | None]:
        """(NCE value, its gradient w.r.t. ``anchor`` or None): the scores (b, 1 + K) are the
        anchors' dot products with their rows, positive first; the gradient goes back through the
        same product, so it is taken here while the bank (or the gathered rows) is at hand."""
        if dense:
            return self._nce_dense(anchor, bank, rows, side, with_grad)
        gathered = getattr(self, f"memory_{bank}")[rows].float()  # (b, 1 + K, D)
        scores = torch.bmm(gathered, anchor.unsqueeze(2)).squeeze(2)
        if not self._log_z_known and torch.isnan(self.log_z[side]):
            self._estimate_log_z(side, scores)
        value, grad_scores = nce(scores, self.log_z[side], self.num_data, self.temperature, with_grad)
        if grad_scores is None:
            return value, None
        return value, torch.bmm(grad_scores.unsqueeze(1), gathered).squeeze(1)

    def _nce_dense(self, anchor: Tensor, bank: str, rows: Tensor, side: int,
                   with_grad: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`_nce_side` scoring the whole bank in one product, then picking the rows' scores;
        the gradient goes back into that (b, N) matrix (repeats add up) and through the product.
        Between the products it works on a few anchors at a time, so that each pass over their
        scores finds them in cache."""
        b, device = anchor.shape[0], anchor.device
        bank_t = self._float32_bank(bank)  # (D, N)
        full = torch.mm(anchor, bank_t, out=self._scratch.get("full", (b, self.num_data), torch.float32, device))
        if not self._log_z_known and torch.isnan(self.log_z[side]):
            self._estimate_log_z(side, torch.gather(full, 1, rows))
        step = _SCORE_ROWS if device.type == "cpu" else b
        value = full.new_zeros(())
        for lo in range(0, b, step):
            part = full[lo: lo + step]
            scores = self._scratch.get("scores", (step, rows.shape[1]), torch.float32, device)[: part.shape[0]]
            scores = torch.gather(part, 1, rows[lo: lo + step], out=scores)
            part_value, grad_scores = nce(scores, self.log_z[side], self.num_data, self.temperature, with_grad, b)
            value += part_value
            if grad_scores is not None:
                part.zero_().scatter_add_(1, rows[lo: lo + step], grad_scores)
        return value, (torch.mm(full, bank_t.t()) if with_grad else None)

    def _float32_bank(self, name: str) -> Tensor:
        """``memory_<name>`` transposed (D, N), in float32 and in the class order of the pools
        (column p is sample ``order[p]``), for scoring the whole bank; kept in step with the bank.

        In that order the sampler's positions index it directly; transposed, the product with the
        anchors runs without a transposed operand (about 40% faster on one CPU thread than against
        the (N, D) bank, while the backward's product with it is about 10% slower); and a float16
        bank is not converted on every step (which cost about as much as the product): the copy is
        made once (exact: every float16 value is a float32) and then updated with the bank's rows,
        at 4 bytes per value (1024 B per training sample for both banks at feat_dim 128, on top of
        the float16 banks' 512). Only held where the whole bank is scored (N x (b + D) < b x K x D,
        e.g. CIFAR's N = 50000, not ImageNet's 1.28M). Any other write to the bank (a loaded
        checkpoint, DDP's broadcast of buffers) moves the bank's version counter on, and the copy
        is made again; so do new class pools.
        """
        memory, pools = getattr(self, f"memory_{name}"), self._class_pools()
        held = self._float32_banks.get(name)
        if held is None or held[1:] != (memory._version, pools) or held[0].device != memory.device:
            copy = memory.index_select(0, pools.order).float().t().contiguous()
            held = self._float32_banks[name] = (copy, memory._version, pools)
        return held[0]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._log_z_known = False  # a loaded Z may be NaN (saved before the first batch)

    @torch.no_grad()
    def _estimate_log_z(self, side: int, scores: Tensor) -> None:
        """Z = N * mean(exp(score / tau)) over the first batch's positives and negatives (all ranks')."""
        lse = torch.logsumexp(scores.flatten() / self.temperature, 0)
        count = scores.numel()
        if _world() > 1:
            (per_rank,) = _all_ranks(lse[None])  # (world,): equal counts per rank
            lse, count = torch.logsumexp(per_rank, 0), count * per_rank.shape[0]
        self.log_z[side] = lse - math.log(count) + math.log(self.num_data)

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        v_s, v_t = v_s.detach().float(), v_t.detach().float()
        if _world() > 1:  # every rank writes every rank's rows: one bank everywhere
            index, v_s, v_t = _all_ranks(index, v_s, v_t)
            index, first = _first_occurrences(index)
            v_s, v_t = v_s[first], v_t[first]
        m = self.momentum
        for name, v in (("student", v_s), ("teacher", v_t)):
            memory = getattr(self, f"memory_{name}")
            held = self._float32_banks.get(name)
            in_step = held is not None and held[1:] == (memory._version, self.pools) and held[0].device == memory.device
            mixed = memory[index].float() * m + v * (1 - m)
            memory.index_copy_(0, index, F.normalize(mixed, p=2, dim=1).to(memory.dtype))
            if in_step:  # read back: of repeated indices, the row the bank kept
                held[0].index_copy_(1, self.pools.positions_of(index), memory[index].float().t())
                self._float32_banks[name] = (held[0], memory._version, self.pools)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_ranks(*tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows from every rank, in rank order, on every rank (shapes equal across ranks)."""
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(_world())]
        dist.all_gather(parts, tensor.contiguous())
        out.append(torch.cat(parts))
    return out


def _first_occurrences(index: Tensor) -> tuple[Tensor, Tensor]:
    """(the distinct indices, the position of each one's first occurrence): a sample padded onto
    two ranks is written once, the same way on every rank and device."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(unique, index.numel()).scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
