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

import functools
import inspect
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from compressor.errors import UserError
from compressor.trainer.config import TrainConfig

OptimizerFactory = Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]


_GUARDED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


@functools.lru_cache(maxsize=None)
def eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` calling its methods without torch.compile's guards around them.

    torch.optim wraps ``step`` (``_use_grad_for_differentiable``) and ``add_param_group``,
    ``zero_grad``, ``state_dict``, ``load_state_dict`` (``torch._disable_dynamo``) so that
    torch.compile does not trace into them. In eager mode the wrappers do nothing but set the grad
    mode, yet their first call imports ``torch._dynamo``: about 1 s of CPU (3 s of wall time on a
    loaded machine), as long as importing torch itself, at the start of every training command,
    none of which compiles. The subclass calls the functions under the wrappers (``step`` in the
    grad mode the wrapper sets: off unless the optimiser is ``differentiable``), the same code; a
    method a torch version does not wrap is left as it is. Same state dict, same steps.
    """
    namespace: dict[str, Any] = {"__doc__": f"{cls.__name__} without torch.compile's guards (see eager)."}
    for name in _GUARDED:
        method = getattr(cls, name)
        bare = inspect.unwrap(method)
        if bare is not method:
            namespace[name] = bare
    step = getattr(cls, "step")
    bare_step = inspect.unwrap(step)
    if bare_step is not step:
        def unguarded_step(self, *args: Any, **kwargs: Any) -> Any:
            with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
                return bare_step(self, *args, **kwargs)

        namespace["step"] = functools.wraps(bare_step)(unguarded_step)
    return type(cls.__name__, (cls,), namespace)


def _sgd(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.SGD)(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                                  weight_decay=c.weight_decay)


def _adam(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    # L2 weight decay added to the gradient, as the papers' Adam runs did
    return eager(torch.optim.Adam)(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def _adamw(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.AdamW)(groups, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)


def _rmsprop(groups: list[dict[str, Any]], c: TrainConfig) -> torch.optim.Optimizer:
    return eager(torch.optim.RMSprop)(groups, lr=c.lr, momentum=c.momentum if c.momentum < 1 else 0.0,
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
