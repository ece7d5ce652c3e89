"""Learning-rate schedules: the lr multiplier as a pure function of training progress.

Progress is ``t = epoch + step / steps_per_epoch`` (epochs from 0), so a resumed run sets exactly
the lr the uninterrupted run set, with no scheduler object to restore. The one stateful part,
reduce-on-plateau (used on top of step decay by the attention-cohort paper, Sec. 4.1), keeps three
numbers in :meth:`LrSchedule.state_dict`.

  * ``step``:     lr * gamma^(number of milestones <= epoch)  (He et al. 2016; RepDistiller: 0.1 at 150/180/210)
  * ``cosine``:   min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2, per step (Loshchilov & Hutter 2017)
  * ``constant``: lr
A linear warm-up from lr/10 over ``warmup_epochs`` precedes any of them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from compressor.trainer.config import TrainConfig

ScheduleFn = Callable[[TrainConfig, float], float]  # (config, t) -> absolute lr for a base lr of config.lr


def _step(config: TrainConfig, t: float) -> float:
    epoch = int(t)
    return config.lr * config.gamma ** sum(1 for m in config.milestones if m <= epoch)


def _cosine(config: TrainConfig, t: float) -> float:
    start = config.warmup_epochs
    span = max(config.epochs - start, 1e-12)
    progress = min(max((t - start) / span, 0.0), 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(config: TrainConfig, t: float) -> float:
    return config.lr


SCHEDULES: dict[str, ScheduleFn] = {"step": _step, "cosine": _cosine, "constant": _constant}


def register_schedule(name: str, fn: ScheduleFn) -> None:
    """Add a schedule ``fn(config, t) -> lr`` (t = fractional epochs done); pure in t."""
    SCHEDULES[name] = fn


class LrSchedule:
    """Sets every param group's lr to ``group['base_lr'] * factor(t)`` before each step."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.fn = SCHEDULES[config.schedule]
        self.plateau_best: float | None = None
        self.plateau_bad = 0
        self.plateau_reductions = 0

    def factor(self, t: float) -> float:
        c = self.config
        f = self.fn(c, t) / c.lr
        if t < c.warmup_epochs:
            f *= 0.1 + 0.9 * t / c.warmup_epochs
        return f * c.plateau_factor**self.plateau_reductions

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Set the lr for ``step`` of ``epoch``; returns the multiplier it used."""
        f = self.factor(epoch + step / max(steps_per_epoch, 1))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return f

    def end_epoch(self, metric: float | None, higher_is_better: bool = True) -> None:
        """Reduce-on-plateau bookkeeping; a no-op unless ``plateau_patience`` > 0."""
        if self.config.plateau_patience <= 0 or metric is None or not math.isfinite(metric):
            return
        value = metric if higher_is_better else -metric
        if self.plateau_best is None or value > self.plateau_best:
            self.plateau_best, self.plateau_bad = value, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad >= self.config.plateau_patience:
            self.plateau_reductions += 1
            self.plateau_bad = 0

    def state_dict(self) -> dict[str, float | int | None]:
        return {
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
            "plateau_reductions": self.plateau_reductions,
        }

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.plateau_best = state["plateau_best"]  # type: ignore[assignment]
        self.plateau_bad = int(state["plateau_bad"])  # type: ignore[arg-type]
        self.plateau_reductions = int(state["plateau_reductions"])  # type: ignore[arg-type]
