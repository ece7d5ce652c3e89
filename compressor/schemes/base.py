"""The contract between a scheme (how models learn together) and the one trainer.

A scheme is an ``nn.Module`` that owns every model and loss part of a training run, so the
trainer can checkpoint it with ``state_dict()``, move it with ``.to()``, wrap it in DDP and
optimise ``trainable_parameters()``. Its ``forward(batch)`` returns named loss terms; the
trainer sums them, back-propagates and steps. Frozen teachers are held without gradients and
kept in eval mode whatever ``train()`` is called with.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch.nn as nn
from torch import Tensor

from compressor.batch import Batch


class Scheme(nn.Module):
    # True when some parameters may receive no gradient in a step (DDP must then search for them)
    has_unused_parameters: bool = False

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms for one batch; their sum is what the trainer minimises."""
        raise NotImplementedError

    def eval_models(self) -> dict[str, nn.Module]:
        """Models whose accuracy the trainer reports each epoch; the first is the primary one."""
        raise NotImplementedError

    def deployable(self) -> nn.Module:
        """The single plain model that is saved, exported and measured."""
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (teachers): kept in eval mode, excluded from optimisation."""
        return []

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in frozen)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: ``{"params": [...]}`` plus optional ``lr_scale`` (times the recipe's lr),
        ``lr`` (absolute) or ``weight_decay``; override to give loss parts their own settings."""
        return [{"params": list(self.trainable_parameters())}]

    def after_step(self) -> None:
        """Called after each optimiser step (EMA teachers, memory banks)."""

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the trainer before each epoch (0-based): loss warm-ups and schedules (DKD).

        Passes the epoch on to every part that takes it: knowledge losses and aggregators declare
        ``set_epoch`` on their base classes (compressor.knowledge.base, compressor.schemes.aggregators)."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_epoch"):
                module.set_epoch(epoch, num_epochs)

    def observe_validation(self, top1: Mapping[str, float]) -> str | None:
        """Called by the trainer after each epoch's validation with every eval model's top-1; returns
        the model that stands for the epoch (a cohort's chosen peer), or None for the primary one."""
        return None

    def bind_train_labels(self, labels: Tensor) -> None:
        """Called by the trainer before training with the training split's labels (by sample
        index): losses that sample by class (CRD's negatives) keep them."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_train_labels"):
                module.set_train_labels(labels)

    # -- two-stage methods: an initialisation phase before ordinary training -----------------
    # The trainer (compressor/trainer/init_phase.py) asks init_phase_epochs(); when > 0 it calls
    # set_phase("init"), trains that many epochs, then set_phase("main") and trains as usual.

    def init_phase_epochs(self) -> int:
        """Epochs of the initialisation phase this scheme needs before ordinary training (0: none)."""
        return 0

    def set_phase(self, phase: str) -> None:
        """``"init"`` or ``"main"``: which objective and parameters the next epochs train."""
        if phase not in ("init", "main"):
            raise ValueError(f"unknown phase {phase!r}")

    def train(self, mode: bool = True) -> "Scheme":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self
