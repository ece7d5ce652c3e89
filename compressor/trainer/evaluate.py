"""Accuracy of a classifier on a split: top-1, top-5, per class, mean cross-entropy.

Counts are kept as tensors on the model's device and summed over DDP ranks before any division,
so a sharded evaluation reports exactly what one process would.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.threads import governed, threads_for
from compressor.trainer.distributed import DistContext
from compressor.trainer.precision import Precision


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float  # mean cross-entropy
    count: int
    per_class: list[float] = field(default_factory=list)  # percent correct per class (nan where absent)
    per_class_count: list[int] = field(default_factory=list)

    def to_dict(self, per_class: bool = False) -> dict[str, object]:
        out: dict[str, object] = {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}
        if per_class:
            out["per_class"] = self.per_class
            out["per_class_count"] = self.per_class_count
        return out


class Counts:
    """Running sums of a classification split, on device, for one model."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.k = min(5, num_classes)
        self.correct1 = torch.zeros((), dtype=torch.float64, device=device)
        self.correctk = torch.zeros((), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        if keep is not None:
            logits, y = logits[keep], y[keep]
        logits = logits.float()
        topk = logits.topk(self.k, dim=1).indices
        hit = topk == y[:, None]
        hit1 = hit[:, 0]
        self.correct1 += hit1.sum()
        self.correctk += hit.any(dim=1).sum()
        self.loss += F.cross_entropy(logits, y, reduction="sum")
        self.count += y.numel()
        self.class_total += torch.bincount(y, minlength=self.num_classes).to(self.class_total.dtype)
        self.class_correct += torch.bincount(y[hit1], minlength=self.num_classes).to(self.class_correct.dtype)

    def result(self, ctx: DistContext | None = None) -> EvalResult:
        packed = torch.cat([torch.stack([self.correct1, self.correctk, self.loss, self.count]),
                            self.class_correct, self.class_total])
        if ctx is not None:
            ctx.all_reduce_sum(packed)
        c1, ck, loss, n = packed[:4].tolist()
        cc = packed[4:4 + self.num_classes].tolist()
        ct = packed[4 + self.num_classes:].tolist()
        n = max(n, 1.0)
        return EvalResult(
            top1=100.0 * c1 / n,
            top5=100.0 * ck / n,
            loss=loss / n,
            count=int(packed[3].item()),
            per_class=[100.0 * a / b if b else float("nan") for a, b in zip(cc, ct)],
            per_class_count=[int(b) for b in ct],
        )


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    num_classes: int,
    *,
    precision: Precision | None = None,
    ctx: DistContext | None = None,
    num_samples: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` (put in eval mode, restored after) under ``torch.inference_mode``."""
    return evaluate_many({"model": model}, batches, num_classes, precision=precision, ctx=ctx,
                         num_samples=num_samples)["model"]


def evaluate_many(
    models: dict[str, nn.Module],
    batches: Sequence[Batch] | Iterable[Batch],
    num_classes: int,
    *,
    precision: Precision | None = None,
    ctx: DistContext | None = None,
    num_samples: int | None = None,
) -> dict[str, EvalResult]:
    """Several models on one pass over the data (a cohort's peers share each batch).

    Under DDP each rank sees a shard of an unshuffled split padded (like DistributedSampler) by
    repeating its head; with ``num_samples`` (the split's size) those repeats are not counted:
    the k-th sample of rank r sits at padded position ``r + k * world_size``, a repeat iff >= n.
    """
    counters = {}
    states = {}
    for name, model in models.items():
        device = next(iter(model.parameters()), torch.empty(0)).device
        counters[name] = Counts(num_classes, device)
        states[name] = model.training
        model.eval()
    seen = 0
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            batches = _with_own_threads(stack, models, batches)
            for batch in batches:
                x = precision.prepare_input(batch.x) if precision else batch.x
                keep = None
                if ctx is not None and ctx.enabled and num_samples is not None:
                    k = torch.arange(seen, seen + batch.y.shape[0], device=batch.y.device)
                    keep = ctx.rank + k * ctx.world_size < num_samples
                seen += batch.y.shape[0]
                for name, model in models.items():
                    if precision:
                        with precision.autocast():
                            logits = model(x)
                    else:
                        logits = model(x)
                    counters[name].add(logits, batch.y, keep)
    finally:
        for name, model in models.items():
            model.train(states[name])
    return {name: c.result(ctx) for name, c in counters.items()}


def _with_own_threads(stack: contextlib.ExitStack, models: dict[str, nn.Module],
                      batches: Iterable[Batch]) -> Iterable[Batch]:
    """A bare evaluation (a teacher's score, a probe) chooses its threads as ``fit`` does, sized by
    its first batch, for as long as ``stack`` is open; under a run's governor it keeps the run's."""
    if governed():
        return batches
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return batches
    nets = list(models.values())
    device = next(iter(nets[0].parameters()), torch.empty(0)).device  # the models', not the batches'
    stack.enter_context(threads_for(nets, tuple(first.x.shape[1:]), first.x.shape[0], device_type=device.type))
    return itertools.chain([first], batches)


class Renormalize(nn.Module):
    """Feeds a model inputs normalised its own way when the data source normalises another way:
    ``x_model = (x_source * std_s + mean_s - mean_m) / std_m``, per channel."""

    def __init__(self, model: nn.Module, source_mean: Sequence[float], source_std: Sequence[float],
                 model_mean: Sequence[float], model_std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        scale = torch.tensor(source_std) / torch.tensor(model_std)
        shift = (torch.tensor(source_mean) - torch.tensor(model_mean)) / torch.tensor(model_std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1).float())
        self.register_buffer("shift", shift.view(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def check_fits(label: str, num_classes: int | None, input_shape: Sequence[int] | None, in_chans: int | None,
               data_name: str, data_classes: int, data_shape: Sequence[int], advice: str = "") -> None:
    """A clear UserError when a model cannot be used on a dataset: classes, channels, size (what the
    model does not record is not checked). ``advice`` ends the line (what to do about it)."""
    end = f": {advice}" if advice else ""
    if num_classes is not None and num_classes != data_classes:
        raise UserError(f"{label} predicts {num_classes} classes but {data_name} has {data_classes}{end}")
    if in_chans is not None and in_chans != data_shape[0]:
        raise UserError(f"{label} takes {in_chans}-channel images but {data_name} has {data_shape[0]}-channel "
                        f"images{end}")
    if input_shape is not None and tuple(input_shape) != tuple(data_shape):
        fmt = "x".join
        raise UserError(f"{label} was trained on {fmt(map(str, input_shape))} inputs but {data_name} is "
                        f"{fmt(map(str, data_shape))}{end}")


def class_names_warning(label: str, model_names: Sequence[str] | None, data_name: str,
                        data_names: Sequence[str]) -> str | None:
    """One warning line when a model's recorded class names differ from the data's (same count):
    its outputs may stand for other classes, or only be named differently. None when they agree
    or the model records none (foreign checkpoints)."""
    if not model_names or list(model_names) == list(data_names) or len(model_names) != len(data_names):
        return None
    differ = [i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b]
    first = differ[0]
    return (f"warning: {label}'s class names differ from {data_name}'s in {len(differ)} of {len(data_names)} "
            f"classes (class {first}: {model_names[first]!r} vs {data_names[first]!r}); its outputs may stand for "
            "other classes")
