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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from compressor.batch import Batch
from compressor.errors import UserError
from compressor.schemes.base import Scheme
from compressor.threads import ThreadGovernor, measure_work, requested
from compressor.trainer import distributed, init_phase
from compressor.trainer.config import TrainConfig
from compressor.trainer.distributed import DistContext
from compressor.trainer.evaluate import EvalResult, evaluate, evaluate_many
from compressor.trainer.learning_guard import check_learning
from compressor.trainer.optim import build_optimizer, param_groups_of
from compressor.trainer.precision import resolve_precision
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
        self.scored = 0
        self.terms: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor | None, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.images += n
        for name, value in losses.items():
            acc = self.terms.get(name)
            if acc is None:
                acc = self.terms[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            acc.add_(value.detach(), alpha=n)
        if logits is not None and logits.shape[0] == n:
            self.correct.add_((logits.argmax(dim=1) == y).sum())
            self.scored += n

    def reduce(self, ctx: DistContext) -> dict[str, Any]:
        names = sorted(self.terms)
        counts = torch.tensor([float(self.images), float(self.scored)], dtype=torch.float64, device=self.device)
        packed = torch.cat([counts, torch.stack([self.correct, *(self.terms[k] for k in names)])])
        ctx.all_reduce_sum(packed)
        images, scored, correct, *sums = packed.tolist()
        terms = {k: s / max(images, 1.0) for k, s in zip(names, sums)}
        return {
            "images": int(images),
            "loss": sum(terms.values()),
            "terms": terms,
            "top1": 100.0 * correct / scored if scored else None,
        }


class _NonFiniteWatch:
    """Finds the first step of an epoch whose loss was NaN or infinite. On the CPU it looks at each
    loss as it comes (free); on an accelerator it keeps the losses of the last ``every`` steps in a
    device buffer and looks at them together, so the host does not wait on the device every step."""

    def __init__(self, device: torch.device, every: int) -> None:
        self.every = every
        self.buffer = torch.zeros(every, dtype=torch.float32, device=device) if every > 1 else None
        self.base = 0  # the step held in buffer[0]
        self.last: torch.Tensor | None = None

    def record(self, step: int, loss: torch.Tensor) -> None:
        if self.buffer is None:
            self.last = loss.detach()
        else:
            self.buffer[step - self.base] = loss.detach()

    def due(self, step: int, steps: int) -> bool:
        return (step + 1 - self.base) >= self.every or step + 1 == steps

    def first_bad(self, step: int) -> int | None:
        """The first non-finite step since the last call (None if none); resets the window."""
        if self.buffer is None:
            value = self.last.item() if self.last is not None else 0.0
            return None if math.isfinite(value) else step
        window = self.buffer[: step + 1 - self.base]
        bad = (~torch.isfinite(window)).nonzero()
        first = None if bad.numel() == 0 else self.base + int(bad[0, 0].item())
        self.base = step + 1
        return first


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
    if the caller has not, and lives until the process exits. CPU threads follow
    :mod:`compressor.threads` for the run (``--threads`` wins) and are put back afterwards.
    """
    ctx = ctx or distributed.setup(config.device)
    # --- before the main run (init_phase.py): training labels for class-aware losses (CRD),
    # and the init phase of a two-stage method (FSP), resumable on its own state file
    init_phase.bind_train_labels(scheme, source)
    say = echo if echo is not None and ctx.is_main else None
    with ThreadGovernor(_work_per_op(scheme, source, config, ctx), say=say, device_type=ctx.device.type) as threads:
        init_phase.run_init_phase(scheme, source, config, state_path=state_path, log_path=log_path, resume=resume,
                                  echo=echo, ctx=ctx)
        # ---
        run = _Run(scheme, source, config, state_path=state_path, log_path=log_path, ctx=ctx, echo=echo)
        run.threads = threads
        run.start(resume)
        try:
            for epoch in range(run.start_epoch, config.epochs):
                run.epoch(epoch)
        finally:
            run.tap.close()
        return run.finish()


def _work_per_op(scheme: Scheme, source: DataSourceLike, config: TrainConfig, ctx: DistContext):
    """The largest op of the trained models at this rank's batch (CPU runs choosing their threads)."""
    shape = getattr(source, "input_shape", None)
    if ctx.device.type != "cpu" or requested() is not None or shape is None:
        return None
    return measure_work(list(scheme.eval_models().values()), tuple(shape), max(1, config.batch_size // ctx.world_size))


class _Run:
    """The state of one ``fit`` call; each method is one phase of it."""

    def __init__(self, scheme: Scheme, source: DataSourceLike, config: TrainConfig, *,
                 state_path: str | Path | None, log_path: str | Path | None, ctx: DistContext,
                 echo: Echo | None) -> None:
        self.scheme, self.config, self.ctx = scheme, config, ctx
        self.state_path = state_path
        self.device = device = ctx.device
        self.say: Echo = echo if echo is not None and ctx.is_main else (lambda _msg: None)
        configure_determinism(device, config.deterministic)
        if config.batch_size % ctx.world_size:
            raise UserError(f"batch size {config.batch_size} does not split over {ctx.world_size} processes: "
                            f"use a multiple of {ctx.world_size}")
        self.batch = config.batch_size // ctx.world_size
        self.eval_batch = config.eval_batch_size or 4 * config.batch_size

        self.source = source.to(device)
        scheme.to(device)
        for module in scheme.frozen_modules():
            module.requires_grad_(False)
        self.precision = resolve_precision(config, device, scheme, getattr(self.source, "input_shape", None))
        self.precision.prepare_module(scheme)
        if config.extra.get("phase") != init_phase.INIT:  # the same choice: said once, by the main run
            self.say(self.precision.line())
        self.optimizer = build_optimizer(param_groups_of(scheme), config)
        self.schedule = LrSchedule(config)
        self.scaler = self.precision.grad_scaler()
        self.model: nn.Module = scheme
        if ctx.enabled:
            self.model = DistributedDataParallel(
                scheme, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=scheme.has_unused_parameters,
            )

        self.drop_last = _lone_last_sample(self.source.split_size("train"), ctx.world_size, self.batch)
        self.has_val = self.source.split_size("val") > 0
        self.select = config.select if self.has_val else "last"
        if self.select != config.select:
            self.say(f"no validation split: the last epoch's weights are kept (instead of the best {config.select})")
        self.key, self.higher = _selection(self.select)
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_value = 0, None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0
        self.log_fresh = False
        self.log = JsonlLog(log_path if ctx.is_main else None)
        self.primary_name, primary = next(iter(scheme.eval_models().items()))
        self.tap = _LogitsTap(primary)
        # how often the host looks at the loss (NaN guard, progress): every step costs nothing on
        # one CPU process; on an accelerator or across ranks it would stall the pipeline
        self.sync_every = 1 if device.type == "cpu" and not ctx.enabled else 25
        self.bar_on = show_bar(config.progress, ctx.is_main)
        self.threads: ThreadGovernor | None = None  # set by fit for the run

    def start(self, resume: bool) -> None:
        """Continue from the saved training state when asked and there is one; else start afresh."""
        path = self.state_path
        if resume and path is not None and Path(path).is_file():
            state = load_state(path, map_location=self.device)
            _restore(state, self.scheme, self.optimizer, self.schedule, self.scaler, self.config, path, self.say)
            self.start_epoch = int(state["epoch"])
            self.history = list(state["history"])
            best = state["best"]
            self.best_epoch, self.best_value, self.best_weights = int(best["epoch"]), best["value"], best["state_dict"]
            self.log.rewrite(self.history)
            self.say(f"resumed from {path} after epoch {self.start_epoch}/{self.config.epochs}")
        else:
            if resume:
                self.say(f"no training state at {path}: starting from scratch")
            self.log_fresh = True  # an earlier run's log stays until this run has an epoch to replace it with

    def epoch(self, epoch: int) -> None:
        """Train one epoch, validate, pick the best, save the state, log."""
        config, ctx = self.config, self.ctx
        seed_epoch(config.seed, epoch, ctx.rank)
        self.scheme.start_epoch(epoch, config.epochs)
        self.scheme.train()
        started = time.perf_counter()
        record = self.train_epoch(epoch)
        if self.has_val:
            record.update(self.validate())
        record["time_s"] = time.perf_counter() - started

        value = record.get(self.key)
        if self.select == "last" or _is_better(value, self.best_value, self.higher):
            self.best_epoch, self.best_value = epoch + 1, value
            if self.select != "last":
                self.best_weights = _cpu_copy(self.scheme.deployable().state_dict())
        self.schedule.end_epoch(record.get("val_top1"))
        self.history.append(record)
        if ctx.is_main and self.state_path is not None:
            save_state(self.state_path, self.state(epoch + 1))
        ctx.barrier()
        if self.log_fresh:
            self.log.rewrite(self.history)
            self.log_fresh = False
        else:
            self.log.append(record)
        self.say(_summary(record, config.epochs))
        if config.stop_when_not_learning:
            check_learning(self.history, self.source.num_classes, config.epochs)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        config, ctx, precision, optimizer = self.config, self.ctx, self.precision, self.optimizer
        loader = self.source.loader("train", self.batch, shuffle=True, augment=config.augment,
                                    drop_last=self.drop_last, seed=config.seed, epoch=epoch, rank=ctx.rank,
                                    world_size=ctx.world_size)
        steps = len(loader)
        if ctx.enabled:  # every rank must take the same number of steps or DDP hangs
            steps = int(ctx.all_reduce_min(torch.tensor(steps, device=self.device)).item())
        stats = _EpochStats(self.device)
        watch = _NonFiniteWatch(self.device, self.sync_every)
        epoch_lr = optimizer.param_groups[0]["base_lr"] * self.schedule.factor(float(epoch))
        bar = epoch_bar(steps, epoch + 1, config.epochs, self.bar_on)
        t0 = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            if self.threads is not None:
                self.threads.poll()
            self.schedule.apply(optimizer, epoch, step, steps)
            batch = Batch(precision.prepare_input(batch.x), batch.y, batch.index)
            self.tap.arm()
            with precision.autocast():
                losses = self.model(batch)
            if not losses:
                raise ValueError(f"{type(self.scheme).__name__}.forward returned no loss terms")
            terms = iter(losses.values())
            loss = next(terms)
            for term in terms:
                loss = loss + term
            watch.record(step, loss)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.grad_clip > 0:
                self.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            self.scheme.after_step()
            stats.add(losses, self.tap.take(), batch.y)
            if watch.due(step, steps):
                _guard(watch.first_bad(step), ctx, epoch, step, steps, losses, self.state_path, self.history)
                if self.bar_on:
                    bar.update(step + 1 - bar.n)
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=_running_acc(stats),
                                    ips=f"{stats.images * ctx.world_size / max(elapsed, 1e-9):.0f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - t0
        bar.close()
        train = stats.reduce(ctx)
        return {
            "epoch": epoch + 1,
            "lr": epoch_lr,
            "loss": train["loss"],
            "loss_terms": train["terms"],
            "train_top1": train["top1"],
            "images_per_s": train["images"] / max(train_time, 1e-9),
            "train_time_s": train_time,
            "threads": torch.get_num_threads(),  # at the epoch's end (compressor.threads may change it mid-run)
        }

    def validate(self) -> dict[str, Any]:
        """Every eval model on the validation split; the first one's figures are the epoch's."""
        ctx = self.ctx
        loader = self.source.loader("val", self.eval_batch, shuffle=False, augment=False,
                                    rank=ctx.rank, world_size=ctx.world_size)
        vals = evaluate_many(self.scheme.eval_models(), loader, self.source.num_classes,
                             precision=self.precision, ctx=ctx, num_samples=self.source.split_size("val"))
        primary = vals[self.primary_name]
        out: dict[str, Any] = {}
        # a cohort: the candidate it chose on validation stands for the epoch
        chosen = self.scheme.observe_validation({n: r.top1 for n, r in vals.items()})
        if chosen in vals:
            primary = vals[chosen]
            out["val_chosen"] = chosen
        out.update(val_top1=primary.top1, val_top5=primary.top5, val_loss=primary.loss)
        if len(vals) > 1:
            out["val_models"] = {n: r.to_dict() for n, r in vals.items()}
        return out

    def state(self, epochs_done: int) -> dict[str, Any]:
        """What resuming after ``epochs_done`` needs (see :mod:`compressor.trainer.state`)."""
        return {
            "epoch": epochs_done,
            "seed": self.config.seed,
            "config": self.config.to_dict(),
            "world_size": self.ctx.world_size,
            "data": _describe(self.source),
            "scheme": self.scheme.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": {"epoch": self.best_epoch, "value": self.best_value, "select": self.select,
                     "state_dict": self.best_weights},
            "history": self.history,
        }

    def finish(self) -> TrainResult:
        """Put the best epoch's weights in the deployable and score it on the test split, once."""
        ctx, source = self.ctx, self.source
        deployable = self.scheme.deployable()
        if self.best_weights is not None:
            deployable.load_state_dict(self.best_weights)
        deployable.to(memory_format=torch.contiguous_format)
        test = None
        if source.split_size("test") > 0:
            loader = source.loader("test", self.eval_batch, shuffle=False, augment=False,
                                   rank=ctx.rank, world_size=ctx.world_size)
            test = evaluate(deployable, loader, source.num_classes, precision=self.precision, ctx=ctx,
                            num_samples=source.split_size("test"))
        return TrainResult(history=self.history, best_epoch=self.best_epoch, select=self.select,
                           best_value=self.best_value, test=test, deployable=deployable, config=self.config,
                           rank=ctx.rank, world_size=ctx.world_size)


def _guard(bad_step: int | None, ctx: DistContext, epoch: int, step: int, steps: int,
           losses: dict[str, torch.Tensor], state_path: str | Path | None,
           history: list[dict[str, Any]]) -> None:
    """Stop every rank together when any saw a non-finite loss; the state on disk is untouched."""
    never = 1 << 62
    if ctx.enabled:  # all ranks take part, so none is left waiting in a collective
        flag = torch.tensor(never if bad_step is None else bad_step, dtype=torch.int64, device=ctx.device)
        reduced = int(ctx.all_reduce_min(flag).item())
        bad_step = None if reduced >= never else reduced
    if bad_step is None:
        return
    terms = ""
    if bad_step == step:
        shown = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in losses.items())
        terms = f" ({shown})"
    done = len(history)
    if state_path is not None and done > 0:
        kept = (f"the last good training state (after epoch {done}) is kept at {state_path}. Lower the learning "
                "rate (or set grad_clip) and run again (--resume continues from the kept state)")
    else:
        kept = ("no epoch had finished, so there is no training state to keep. Lower the learning rate "
                "(or set grad_clip) and run again")
    raise TrainingDiverged(
        f"training diverged: the loss became NaN or infinite at epoch {epoch + 1}, step {bad_step + 1} "
        f"of {steps}{terms}; {kept}",
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
    return f"{100.0 * stats.correct.item() / stats.scored:.1f}%" if stats.scored else "-"


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
