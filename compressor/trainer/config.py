"""What one training run needs to know, as one plain, serialisable dataclass.

A plan stage carries a :class:`TrainConfig`; the trainer reads nothing else. Every field is a
primitive (or a tuple of them) so the config goes into a checkpoint and a YAML plan unchanged.
Defaults are the CIFAR knowledge-distillation benchmark's (Tian et al., CRD / RepDistiller, also
used by ModReduce): SGD, momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 divided by 10 at
epochs 150, 180 and 210 of 240.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from compressor.errors import UserError
from compressor.typecheck import check_field_types

AMP_MODES = ("auto", "off", "bf16", "fp16")
TOGGLES = ("auto", "on", "off")
SELECT_METRICS = ("val_top1", "val_top5", "val_loss", "last")
# fields that change what is computed; the others (device, amp, quiet, ...) only how or where
RECIPE_FIELDS = (
    "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "betas",
    "schedule", "milestones", "gamma", "min_lr", "warmup_epochs", "plateau_patience",
    "plateau_factor", "label_smoothing", "augment", "seed", "grad_clip", "select",
)


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the GLOBAL batch: under DDP each of N processes takes
    ``batch_size / N`` so a recipe means the same thing on one GPU or eight."""

    epochs: int = 240
    batch_size: int = 64
    # optimiser (see compressor.trainer.optim.OPTIMIZERS)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    # schedule (see compressor.trainer.schedule.SCHEDULES)
    schedule: str = "step"
    milestones: tuple[int, ...] = (150, 180, 210)
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor
    warmup_epochs: int = 0  # linear warm-up from lr/10 (He et al. 2016 warm up ResNet-110 this way)
    plateau_patience: int = 0  # >0: also multiply lr by plateau_factor after this many epochs without a better val metric
    plateau_factor: float = 0.1
    # objective and data
    label_smoothing: float = 0.0  # read by schemes that use cross-entropy
    augment: bool = True
    grad_clip: float = 0.0  # >0: clip the global gradient norm to this
    eval_batch_size: int = 0  # 0: 4 x batch_size
    # model selection: the epoch whose weights are deployed, judged on the VALIDATION split
    select: str = "val_top1"
    # stop (NotLearning) when the model sits at chance or its loss never falls (learning_guard.py)
    stop_when_not_learning: bool = True
    # reproducibility
    seed: int = 0
    deterministic: bool = False  # CUDA: deterministic kernels (slower); CPU is deterministic anyway
    # where and how fast
    device: str = "auto"  # auto: CUDA if present (cuda:LOCAL_RANK under torchrun), else CPU
    amp: str = "auto"  # auto: bf16 on CUDA where supported, else fp16 with a grad scaler; off on CPU
    channels_last: str = "auto"  # auto: on for conv nets on CUDA, and on CPU unless a conv is slower so (precision.py)
    progress: str = "auto"  # auto: a tqdm bar when stderr is a terminal
    extra: dict[str, Any] = field(default_factory=dict)  # scheme-specific settings, recorded as they are

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        from compressor.trainer.optim import OPTIMIZERS
        from compressor.trainer.schedule import SCHEDULES

        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if not 0 < self.lr < math.inf:  # nan and inf fail here too: they would only diverge at the first step
            problems.append(f"learning rate must be a positive finite number (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0 (got {self.weight_decay})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            problems.append(f"milestones must be increasing positive epochs (got {list(self.milestones)})")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warm-up epochs must be in [0, epochs) (got {self.warmup_epochs})")
        if self.amp not in AMP_MODES:
            problems.append(f"amp must be one of {', '.join(AMP_MODES)} (got {self.amp!r})")
        for name in ("channels_last", "progress"):
            if getattr(self, name) not in TOGGLES:
                problems.append(f"{name} must be one of {', '.join(TOGGLES)} (got {getattr(self, name)!r})")
        if self.select not in SELECT_METRICS:
            problems.append(f"select must be one of {', '.join(SELECT_METRICS)} (got {self.select!r})")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def step_milestones(self) -> tuple[int, ...]:
        """Milestones that fall inside the run (a short run keeps only the early ones)."""
        return tuple(m for m in self.milestones if m < self.epochs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["milestones"] = list(self.milestones)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a (YAML/checkpoint) dict; unknown keys are a UserError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown training setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        check_field_types(cls, data, "training setting")  # 'epochs: many' is one line, not a TypeError mid-run
        return cls(**data)

    def recipe_changes(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """Recipe fields that differ from ``other``: ``{name: (other's, ours)}``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (theirs[k], mine[k]) for k in RECIPE_FIELDS if mine[k] != theirs[k]}
