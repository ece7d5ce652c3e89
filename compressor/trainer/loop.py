"""The one training loop: every scheme (vanilla, offline KD, cohorts, chains) trains through ``fit``.

The scheme says what trains (``param_groups()`` / ``trainable_parameters()``) and what to minimise
(``forward(batch)`` -> named losses, summed here). The loop owns the rest: device, mixed precision
and memory format, DDP, optimiser and schedule, per-epoch validation and best-epoch selection on the
VALIDATION split, the per-epoch atomic training state and exact resume, the NaN guard, progress and
the JSONL log, and one final test evaluation of the deployable model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.schemes.base import Scheme
from compressor.trainer import distributed
from compressor.trainer.config import TrainConfig
from compressor.trainer.distributed import DistContext
from compressor.trainer.evaluate import EvalResult, evaluate, evaluate_many
from compressor.trainer.optim import build_optimizer, param_groups_of
from compressor.trainer.precision import Precision, resolve_precision
from compressor.trainer.progress import JsonlLog, epoch_bar, show_bar
from compressor.trainer.schedule import LrSchedule
from compressor.trainer.seeding import configure_determinism, seed_epoch
from compressor.trainer.state import load_state, save_state

Echo = Callable[[str], None]


class DataSourceLike(Protocol):
    """What the trainer uses of :class:`compressor.data.DataSource`."""

    num_classes: int

    def split_size(self, split: str) -> int: ...

    def loader(self, split: str, batch_size: int, *, shuffle: bool, augment: bool, drop_last: bool = False,
               seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterable[Batch]: ...

    def to(self, device: torch.device) -> "DataSourceLike": ...

    def describe(self) -> dict[str, Any]: ...


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good training state was left as it was."""

    def __init__(self, message: str, epoch: int, step: int, last_good_epoch: int) -> None:
        super().__init__(message)
        self.epoch, self.step, self.last_good_epoch = epoch, step, last_good_epoch


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # one record per epoch, as written to the JSONL log
    best_epoch: int  # 1-based epoch whose weights the deployable holds
    select: str  # the validation metric that chose it ("last" when there is no validation split)
    best_value: float | None
    test: EvalResult | None  # the deployable on the test split, evaluated once, at the end
    deployable: nn.Module
    config: TrainConfig
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def best_record(self) -> dict[str, Any]:
        return self.history[self.best_epoch - 1] if self.history else {}

    def metrics(self) -> dict[str, Any]:
        """The flat summary a checkpoint records."""
        best = self.best_record
        out: dict[str, Any] = {
            "epochs": self.config.epochs,
            "best_epoch": self.best_epoch,
            "select": self.select,
            "seed": self.config.seed,
            "val_top1": best.get("val_top1"),
            "val_top5": best.get("val_top5"),
            "train_top1": best.get("train_top1"),
        }
        if self.test is not None:
            out.update(test_top1=self.test.top1, test_top5=self.test.top5, test_loss=self.test.loss,
                       test_count=self.test.count, test_per_class=self.test.per_class)
        return out


class _LogitsTap:
    """Keeps the first logits the primary model produces in a training step (for train accuracy)
    without the scheme having to return them: a forward hook, armed only during the step."""

    def __init__(self, model: nn.Module) -> None:
        self.armed = False
        self.logits: torch.Tensor | None = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.armed and self.logits is None and isinstance(output, torch.Tensor) and output.dim() == 2:
            self.logits = output.detach()

    def arm(self) -> None:
        self.armed, self.logits = True, None

    def take(self) -> torch.Tensor | None:
        logits, self.armed, self.logits = self.logits, False, None
        return logits

    def close(self) -> None:
        self.handle.remove()


class _EpochStats:
    """Sums on the device (no host sync per step): images, correct predictions, each loss term."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.images = 0
        self.terms: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.scored = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor | None, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.images += n
        for name, value in losses.items():
            acc = self.terms.get(name)
            term = value.detach().to(torch.float64) * n
            self.terms[name] = term if acc is None else acc + term
        if logits is not None and logits.shape[0] == n:
            self.correct += (logits.argmax(dim=1) == y).sum()
            self.scored += n

    def reduce(self, ctx: DistContext) -> dict[str, Any]:
        names = sorted(self.terms)
        packed = torch.stack([torch.tensor(float(self.images), dtype=torch.float64, device=self.device),
                              self.correct, self.scored, *(self.terms[k] for k in names)])
        ctx.all_reduce_sum(packed)
        images, correct, scored, *sums = packed.tolist()
        terms = {k: s / max(images, 1.0) for k, s in zip(names, sums)}
        return {
            "images": int(images),
            "loss": sum(terms.values()),
            "terms": terms,
            "top1": 100.0 * correct / scored if scored else None,
        }


def _selection(select: str) -> tuple[str, bool]:
    """(record key, higher is better) for a selection metric."""
    return {"val_top1": ("val_top1", True), "val_top5": ("val_top5", True),
            "val_loss": ("val_loss", False), "last": ("epoch", True)}[select]


def _is_better(value: float | None, best: float | None, higher: bool) -> bool:
    if value is None or not math.isfinite(value):
        return best is None
    if best is None:
        return True
    return value > best if higher else value < best


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def fit(
    scheme: Scheme,
    source: DataSourceLike,
    config: TrainConfig,
    *,
    state_path: str | Path | None = None,
    log_path: str | Path | None = None,
    resume: bool = False,
    echo: Echo | None = None,
    ctx: DistContext | None = None,
) -> TrainResult:
    """Train ``scheme`` on ``source`` as ``config`` says and return the deployable at its best epoch.

    ``state_path``: the training state written after every epoch (rank 0), read by ``resume``.
    ``log_path``: the JSONL file that gets one line per epoch (rank 0). ``echo``: where one summary
    line per epoch goes (rank 0; None = silent). Under torchrun the process group is started here
    if the caller has not (``compressor.trainer.distributed.session`` also ends it).
    """
    ctx = ctx or distributed.setup(config.device)
    device = ctx.device
    say: Echo = (echo if echo is not None and ctx.is_main else (lambda _msg: None))
    configure_determinism(device, config.deterministic)
    if config.batch_size % ctx.world_size:
        raise UserError(f"batch size {config.batch_size} does not split over {ctx.world_size} processes: "
                        f"use a multiple of {ctx.world_size}")
    per_rank_batch = config.batch_size // ctx.world_size
    eval_batch = config.eval_batch_size or 4 * config.batch_size

    source = source.to(device)
    scheme.to(device)
    for module in scheme.frozen_modules():
        module.requires_grad_(False)
    precision = resolve_precision(config, device, scheme)
    precision.prepare_module(scheme)
    optimizer = build_optimizer(param_groups_of(scheme), config)
    schedule = LrSchedule(config)
    scaler = precision.grad_scaler()
    model: nn.Module = scheme
    if ctx.enabled:
        model = DistributedDataParallel(
            scheme,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=scheme.has_unused_parameters,
        )

    drop_last = _lone_last_sample(source.split_size("train"), ctx.world_size, per_rank_batch)
    has_val = source.split_size("val") > 0
    select = config.select if has_val else "last"
    if select != config.select:
        say(f"no validation split: the last epoch's weights are kept (instead of the best {config.select})")
    key, higher = _selection(select)

    history: list[dict[str, Any]] = []
    best_epoch, best_value, best_weights = 0, None, None
    start_epoch = 0
    log = JsonlLog(log_path if ctx.is_main else None)
    if resume and state_path is not None and Path(state_path).is_file():
        state = load_state(state_path, map_location=device)
        _restore(state, scheme, optimizer, schedule, scaler, config, state_path, say)
        start_epoch = int(state["epoch"])
        history = list(state["history"])
        best_epoch = int(state["best"]["epoch"])
        best_value = state["best"]["value"]
        best_weights = state["best"]["state_dict"]
        log.rewrite(history)
        say(f"resumed from {state_path} after epoch {start_epoch}/{config.epochs}")
    else:
        if resume:
            say(f"no training state at {state_path}: starting from scratch")
        log.rewrite([])

    primary_name, primary = next(iter(scheme.eval_models().items()))
    tap = _LogitsTap(primary)
    sync_every = 1 if device.type == "cpu" else 25
    bar_on = show_bar(config.progress, ctx.is_main)
    try:
        for epoch in range(start_epoch, config.epochs):
            seed_epoch(config.seed, epoch, ctx.rank)
            scheme.start_epoch(epoch, config.epochs)
            scheme.train()
            loader = source.loader("train", per_rank_batch, shuffle=True, augment=config.augment,
                                   drop_last=drop_last, seed=config.seed, epoch=epoch, rank=ctx.rank,
                                   world_size=ctx.world_size)
            steps = len(loader)
            if ctx.enabled:  # every rank must take the same number of steps or DDP hangs
                steps = int(ctx.all_reduce_min(torch.tensor(steps, device=device)).item())
            stats = _EpochStats(device)
            first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            epoch_lr = optimizer.param_groups[0]["base_lr"] * schedule.factor(float(epoch))
            bar = epoch_bar(steps, epoch + 1, config.epochs, bar_on)
            t0 = time.perf_counter()
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                schedule.apply(optimizer, epoch, step, steps)
                batch = Batch(precision.prepare_input(batch.x), batch.y, batch.index)
                tap.arm()
                with precision.autocast():
                    losses = model(batch)
                if not losses:
                    raise ValueError(f"{type(scheme).__name__}.forward returned no loss terms")
                loss = sum(losses.values())
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                             config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheme.after_step()
                stats.add(losses, tap.take(), batch.y)
                if (step + 1) % sync_every == 0 or step + 1 == steps:
                    _guard(first_bad, ctx, epoch, step, steps, losses, state_path, history)
                    if bar_on:
                        bar.update(step + 1 - bar.n)
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{loss.item():.3f}", acc=_running_acc(stats),
                                        ips=f"{stats.images * ctx.world_size / max(elapsed, 1e-9):.0f}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            bar.close()
            train = stats.reduce(ctx)

            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": epoch_lr,
                "loss": train["loss"],
                "loss_terms": train["terms"],
                "train_top1": train["top1"],
                "images_per_s": train["images"] / max(train_time, 1e-9),
                "train_time_s": train_time,
            }
            if has_val:
                val_loader = source.loader("val", eval_batch, shuffle=False, augment=False,
                                           rank=ctx.rank, world_size=ctx.world_size)
                vals = evaluate_many(scheme.eval_models(), val_loader, source.num_classes,
                                     precision=precision, ctx=ctx, num_samples=source.split_size("val"))
                primary_val = vals[primary_name]
                observe = getattr(scheme, "observe_validation", None)
                if callable(observe):  # a cohort: its candidate chosen on validation stands for the epoch
                    chosen = observe({n: r.top1 for n, r in vals.items()})
                    if chosen in vals:
                        primary_val = vals[chosen]
                        record["val_chosen"] = chosen
                record.update(val_top1=primary_val.top1, val_top5=primary_val.top5, val_loss=primary_val.loss)
                if len(vals) > 1:
                    record["val_models"] = {n: r.to_dict() for n, r in vals.items()}
            record["time_s"] = time.perf_counter() - t0

            value = record.get(key)
            if select == "last" or _is_better(value, best_value, higher):
                best_epoch, best_value = epoch + 1, value
                best_weights = None if select == "last" else _cpu_copy(scheme.deployable().state_dict())
            schedule.end_epoch(record.get("val_top1") if has_val else None)
            history.append(record)

            if ctx.is_main and state_path is not None:
                save_state(state_path, {
                    "epoch": epoch + 1,
                    "seed": config.seed,
                    "config": config.to_dict(),
                    "world_size": ctx.world_size,
                    "data": _describe(source),
                    "scheme": scheme.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best": {"epoch": best_epoch, "value": best_value, "select": select,
                             "state_dict": best_weights},
                    "history": history,
                })
            ctx.barrier()
            log.append(record)
            say(_summary(record, config.epochs))
    finally:
        tap.close()

    deployable = scheme.deployable()
    if best_weights is not None:
        deployable.load_state_dict(best_weights)
    deployable.to(memory_format=torch.contiguous_format)
    test = None
    if source.split_size("test") > 0:
        test_loader = source.loader("test", eval_batch, shuffle=False, augment=False,
                                    rank=ctx.rank, world_size=ctx.world_size)
        test = evaluate(deployable, test_loader, source.num_classes, precision=precision, ctx=ctx,
                        num_samples=source.split_size("test"))
    return TrainResult(history=history, best_epoch=best_epoch, select=select, best_value=best_value,
                       test=test, deployable=deployable, config=config, rank=ctx.rank,
                       world_size=ctx.world_size)


def _guard(first_bad: torch.Tensor, ctx: DistContext, epoch: int, step: int, steps: int,
           losses: dict[str, torch.Tensor] | None, state_path: str | Path | None,
           history: list[dict[str, Any]]) -> None:
    """Stop every rank together when any saw a non-finite loss; the state on disk is untouched."""
    flag = first_bad.clone()
    flag = torch.where(flag < 0, torch.full_like(flag, 1 << 62), flag)
    bad_step = int(ctx.all_reduce_min(flag).item())
    if bad_step >= 1 << 62:
        return
    terms = ""
    if losses is not None and bad_step == step:
        shown = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in losses.items())
        terms = f" ({shown})"
    done = len(history)
    if state_path is not None and done > 0:
        kept = f"the last good training state (after epoch {done}) is kept at {state_path}"
    else:
        kept = "no epoch had finished, so there is no training state to keep"
    raise TrainingDiverged(
        f"training diverged: the loss became NaN or infinite at epoch {epoch + 1}, step {bad_step + 1} "
        f"of {steps}{terms}; {kept}. Lower the learning rate (or set grad_clip) and run again "
        "(--resume continues from the kept state)",
        epoch=epoch + 1, step=bad_step + 1, last_good_epoch=done,
    )


def _restore(state: dict[str, Any], scheme: Scheme, optimizer: torch.optim.Optimizer, schedule: LrSchedule,
             scaler: torch.amp.GradScaler, config: TrainConfig, path: str | Path, say: Echo) -> None:
    """Load a training state into this run's objects, or say clearly why it does not fit."""
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        scheme.load_state_dict(state["scheme"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"the training state {path} does not fit this run ({first}); "
                        "delete it or drop --resume") from err
    for group, settings in zip(optimizer.param_groups, current):  # this run's settings win
        group.update(settings)
    schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    try:
        saved = TrainConfig.from_dict(state["config"])
    except UserError:
        return
    changes = config.recipe_changes(saved)
    if changes:
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        say(f"warning: resuming with changed settings ({shown}); the result will differ from an "
            "uninterrupted run")


def _lone_last_sample(num_train: int, world_size: int, batch: int) -> bool:
    """Drop the last training batch when it would hold one sample (BatchNorm cannot train on
    one); every rank gets ceil(n / world_size) samples (the data sources pad like DistributedSampler)."""
    per_rank = -(-num_train // world_size)
    return per_rank > 1 and per_rank % batch == 1


def _running_acc(stats: _EpochStats) -> str:
    scored = stats.scored.item()
    return f"{100.0 * stats.correct.item() / scored:.1f}%" if scored else "-"


def _describe(source: DataSourceLike) -> dict[str, Any]:
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else {}


def _summary(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.3g}", f"loss {record['loss']:.4f}"]
    if record.get("train_top1") is not None:
        parts.append(f"train {record['train_top1']:.2f}%")
    if record.get("val_top1") is not None:
        parts.append(f"val {record['val_top1']:.2f}% (top-5 {record['val_top5']:.2f}%)")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)
