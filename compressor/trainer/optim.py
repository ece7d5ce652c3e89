"""Optimisers by name, built from a :class:`TrainConfig` and a scheme's parameter groups.

A scheme hands over what trains through ``param_groups()`` (see :class:`compressor.schemes.Scheme`):
a list of ``{"params": [...], "lr_scale": float, "weight_decay": float}`` dicts, so a recipe can
give a loss's learnable parts (a FitNet regressor, CRD's embeddings) their own learning rate or
decay without the trainer knowing about them. Every group records ``base_lr``, from which the
schedule sets ``lr`` each step.

Papers: SGD with momentum 0.9, optionally Nesterov, weight decay 5e-4 (RepDistiller, ModReduce,
OSAKD); Adam at 1e-3 (attention cohort); RMSProp at 1e-3 (attention cohort, transfer learning).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from compressor.errors import UserError
from compressor.trainer.config import TrainConfig

OptimizerFactory = Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]


def _sgd(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                           weight_decay=c.weight_decay)


def _adam(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    # L2 weight decay added to the gradient, as the papers' Adam runs did
    return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def _adamw(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def _rmsprop(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=c.lr, momentum=c.momentum if c.momentum < 1 else 0.0,
                               weight_decay=c.weight_decay)


OPTIMIZERS: dict[str, OptimizerFactory] = {"sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    OPTIMIZERS[name] = factory


def param_groups_of(module: nn.Module) -> list[dict[str, Any]]:
    """The module's own ``param_groups()`` if it has one, else one group of its trainable params."""
    if hasattr(module, "param_groups"):
        return [dict(g) for g in module.param_groups()]
    return [{"params": [p for p in module.parameters() if p.requires_grad]}]


def build_optimizer(groups: Iterable[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """One optimiser over ``groups``; ``lr_scale`` multiplies ``config.lr``, ``lr`` overrides it."""
    built: list[dict[str, Any]] = []
    seen: set[int] = set()
    for group in groups:
        group = dict(group)
        params = [p for p in group.pop("params") if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError("a parameter appears in two parameter groups")
            seen.add(id(p))
        if not params:
            continue
        scale = float(group.pop("lr_scale", 1.0))
        base_lr = float(group.pop("lr", config.lr * scale))
        built.append({"params": params, **group, "lr": base_lr, "base_lr": base_lr})
    if not built:
        raise UserError("nothing to train: the scheme has no parameter that requires a gradient")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {config.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[config.optimizer](built, config)
