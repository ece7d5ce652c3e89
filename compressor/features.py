"""Feature taps: logits, stage feature maps and the pooled embedding from ANY model, via hooks.

No model is rewritten for distillation. Zoo models declare ``stem_name``, ``stage_names`` and
``classifier_name``; any other model (torchvision, a user's own) has its stages found by one dry
run: for each spatial size, the last module to produce it, kept only while the sizes shrink in
execution order, stopping at the global pooling that feeds the first classifier ``Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from compressor.errors import UserError
from compressor.threads import one_thread


@dataclass
class ModelOutputs:
    """What a knowledge loss sees of one model for one batch."""

    logits: Tensor
    features: list[Tensor]  # stage feature maps (N, C, H, W), shallow -> deep, stem excluded
    embedding: Tensor  # pooled vector that feeds the classifier, (N, D)
    stem: Tensor | None = None  # output of the stem, where the model has a distinct one


@dataclass(frozen=True)
class TapShape:
    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class TapLayout:
    """Shapes of every tap at one input shape, known without a training pass."""

    input_shape: tuple[int, int, int]
    stem: TapShape | None
    stages: tuple[TapShape, ...]
    embedding_dim: int
    num_classes: int

    @property
    def stage_channels(self) -> list[int]:
        return [s.channels for s in self.stages]


class FeatureTaps:
    """Call it like the model; it returns :class:`ModelOutputs` instead of bare logits.

    The hooks only keep references to tensors the forward computes anyway, so the overhead over
    a plain forward is a few Python calls per batch (measured in benchmarks/feature_taps.py).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | None = None,
        *,
        stage_names: Sequence[str] | None = None,
        stem_name: str | None = None,
        classifier_name: str | None = None,
    ) -> None:
        self.model = model
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        stage_names = stage_names if stage_names is not None else getattr(model, "stage_names", None)
        stem_name = stem_name if stem_name is not None else getattr(model, "stem_name", None)
        classifier_name = (
            classifier_name if classifier_name is not None else getattr(model, "classifier_name", None)
        )
        if stage_names is None or classifier_name is None:
            if self.input_shape is None:
                raise UserError(
                    f"{type(model).__name__} declares no stages: give an input shape so they can be found"
                )
            found_stages, found_classifier = discover_stages(model, self.input_shape)
            stage_names = stage_names if stage_names is not None else found_stages
            classifier_name = classifier_name if classifier_name is not None else found_classifier
        self.stage_names: tuple[str, ...] = tuple(stage_names)
        self.stem_name = stem_name
        self.classifier_name = classifier_name
        modules = dict(model.named_modules())
        for name in (*self.stage_names, classifier_name, *([stem_name] if stem_name else [])):
            if name not in modules:
                raise ValueError(f"{type(model).__name__} has no module named {name!r}")
        self._stage_out: list[Tensor | None] = [None] * len(self.stage_names)
        self._stem_out: Tensor | None = None
        self._embedding: Tensor | None = None
        self._handles = []
        for i, name in enumerate(self.stage_names):
            self._handles.append(modules[name].register_forward_hook(_mark(self._stage_hook(i))))
        if stem_name:
            self._handles.append(modules[stem_name].register_forward_hook(_mark(self._stem_hook)))
        self._handles.append(modules[classifier_name].register_forward_pre_hook(_mark(self._classifier_hook)))
        self._layout: TapLayout | None = None

    def _stage_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self._stage_out[index] = output

        return hook

    def _stem_hook(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        self._stem_out = output

    def _classifier_hook(self, _module: nn.Module, inputs: tuple) -> None:
        self._embedding = inputs[0]

    def __call__(self, x: Tensor) -> ModelOutputs:
        logits = self.model(x)
        features = self._stage_out
        if any(f is None for f in features) or self._embedding is None:
            missing = [n for n, f in zip(self.stage_names, features) if f is None]
            raise RuntimeError(f"feature taps did not fire for {missing or [self.classifier_name]}")
        out = ModelOutputs(logits, list(features), self._embedding.flatten(1), self._stem_out)
        self._stage_out = [None] * len(self.stage_names)
        self._stem_out = None
        self._embedding = None
        return out

    def layout(self, input_shape: Sequence[int] | None = None) -> TapLayout:
        """Channel counts and spatial sizes of every tap, from one no-grad forward of one sample."""
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise ValueError("layout needs an input shape")
        if self._layout is not None and self._layout.input_shape == shape:
            return self._layout
        out = _dry_forward(self, shape)
        stages = tuple(
            TapShape(n, f.shape[1], f.shape[2], f.shape[3]) for n, f in zip(self.stage_names, out.features)
        )
        stem = None
        if out.stem is not None and self.stem_name:
            stem = TapShape(self.stem_name, out.stem.shape[1], out.stem.shape[2], out.stem.shape[3])
        self._layout = TapLayout(shape, stem, stages, out.embedding.shape[1], out.logits.shape[1])
        return self._layout

    def remove(self) -> None:
        """Detach the hooks; the model is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


_TAP_MARK = "_kdcompress_feature_tap"


def _mark(hook):
    """Wrap a hook in a function marked as a feature tap, so :func:`strip_taps` can find it on the
    model (or on any deep copy of it) without the :class:`FeatureTaps` that registered it."""

    def tap(*args):
        return hook(*args)

    setattr(tap, _TAP_MARK, True)
    return tap


def strip_taps(model: nn.Module) -> nn.Module:
    """Remove every feature-tap hook from ``model`` and its sub-modules, in place; returns it.

    A scheme taps the models it trains; the model it hands out when training ends (the stage's
    result, the next stage's teacher) must be plain: stale taps would keep firing on every forward,
    hold the last batch's feature maps and be deep-copied along with the model.
    """
    tables = (("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
              ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)))
    for module in model.modules():
        for name, companions in tables:
            hooks = getattr(module, name)
            for key in [k for k, hook in hooks.items() if getattr(hook, _TAP_MARK, False)]:
                del hooks[key]
                for companion in companions:
                    getattr(module, companion, {}).pop(key, None)
    return model


def _dry_forward(fn, input_shape: tuple[int, ...]):
    model = fn.model if isinstance(fn, FeatureTaps) else fn
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad(), one_thread():
            return fn(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def discover_stages(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[str], str]:
    """Find stage modules and the classifier of a model that declares neither (one dry run)."""
    events: list[tuple[str, str, tuple[int, ...]]] = []  # (kind, name, shape) in execution order
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def post(_m, _i, output, name=name, pools=isinstance(module, _GLOBAL_POOLS)):
            if isinstance(output, Tensor):
                events.append(("pool" if pools else "out", name, tuple(output.shape)))

        def pre(_m, inputs, name=name, is_linear=isinstance(module, nn.Linear)):
            if is_linear:
                events.append(("linear", name, tuple(inputs[0].shape)))

        handles.append(module.register_forward_hook(post))
        handles.append(module.register_forward_pre_hook(pre))
    try:
        _dry_forward(model, tuple(input_shape))
    finally:
        for h in handles:
            h.remove()
    last_map = max((i for i, (k, _, s) in enumerate(events) if k in ("out", "pool") and len(s) == 4), default=None)
    if last_map is None:
        raise UserError(f"{type(model).__name__} produces no 4-D feature maps; it cannot be tapped")
    classifier = next((n for k, n, _ in events[last_map:] if k == "linear"), None)
    if classifier is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier after its feature maps")
    cut = next(i for i, (k, n, _) in enumerate(events) if k == "linear" and n == classifier)
    # the global pooling feeding the classifier, and anything after it, is not a stage; a 1x1
    # stage before it is (ResNet-18's layer4 at 32x32 input)
    pool = max((i for i, (k, _, s) in enumerate(events[:cut]) if k == "pool" and s[2:] == (1, 1)), default=cut)
    maps = [(i, n, s) for i, (k, n, s) in enumerate(events[:pool]) if k in ("out", "pool") and len(s) == 4]
    # per spatial size, the shallowest module (a whole block, not a conv inside it), last one run
    last_by_size: dict[tuple[int, int], tuple[int, str]] = {}
    for i, n, s in maps:
        best = last_by_size.get(s[2:])
        if best is None or n.count(".") <= best[1].count("."):
            last_by_size[s[2:]] = (i, n)
    stages: list[tuple[int, str]] = []
    for size in sorted(last_by_size, key=lambda hw: -hw[0] * hw[1]):
        index, name = last_by_size[size]
        if stages and index < stages[-1][0]:
            continue  # a transient map (e.g. squeeze-excite pooling) inside a larger stage
        stages.append((index, name))
    return [n for _, n in stages], classifier
