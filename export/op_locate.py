"""Name the operator an exporter rejected and the module that calls it.

Exporter errors name the ATen operator (TorchScript: ``operator 'aten::histc'``; dynamo:
``target=torch.ops.aten.histc.default``) but not where it sits in the user's model. One forward
pass under a recording mode answers that: forward hooks keep a stack of the module paths being
executed, and a dispatch mode (ATen level) plus a function mode (``torch.*`` level, for composite
ops that ATen decomposes before dispatch) note the innermost module of every op call.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN_NAME = re.compile(r"\baten(?:::|\.)([A-Za-z][A-Za-z0-9_]*)")
# Ops that appear in exporter messages without being the culprit (they are everywhere).
_NOISE = {"empty", "view", "copy", "clone", "to", "detach", "lift_fresh", "t", "conv2d", "convolution", "linear"}


def ops_in_error(text: str) -> list[str]:
    """ATen op names mentioned in an exporter's error text, in order of first mention."""
    found: list[str] = []
    for match in _ATEN_NAME.finditer(text):
        name = match.group(1)
        if name not in found and name not in _NOISE:
            found.append(name)
    return found


class _ModuleStack:
    """Forward hooks that keep the dotted path of the module currently executing."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, str]] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._push(name, type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._pop))

    def _push(self, name: str, kind: str):
        def hook(_module, _inputs):
            self.stack.append((name, kind))

        return hook

    def _pop(self, _module, _inputs, _output):
        if self.stack:
            self.stack.pop()

    def top(self) -> tuple[str, str]:
        return self.stack[-1] if self.stack else ("", "")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, modules: _ModuleStack, seen: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.modules, self.seen = modules, seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        self.seen.setdefault(name, self.modules.top())
        return func(*args, **(kwargs or {}))


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, modules: _ModuleStack, seen: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.modules, self.seen = modules, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name:
            self.seen.setdefault(name, self.modules.top())
        return func(*args, **(kwargs or {}))


def op_locations(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[str, str]]:
    """Map every op name one eval forward calls to the (module path, class) that first calls it."""
    seen: dict[str, tuple[str, str]] = {}
    modules = _ModuleStack(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FunctionRecorder(modules, seen), _DispatchRecorder(modules, seen):
            model(sample)
    except Exception:  # noqa: BLE001 - the model ran before export; a failure here only loses the location
        pass
    finally:
        modules.remove()
        model.train(was_training)
    return seen


def describe_unexportable(model: nn.Module, sample: torch.Tensor, error_text: str) -> str | None:
    """``"op aten::histc in module 'body.2' (HistPool) has no ONNX translation"``, or None.

    None when the error names no operator the model actually calls (then it is not an op problem).
    """
    candidates = ops_in_error(error_text)
    if not candidates:
        return None
    seen = op_locations(model, sample)
    for op in candidates:
        if op in seen:
            path, kind = seen[op]
            where = f"module '{path}' ({kind})" if path else f"the top-level forward of {type(model).__name__}"
            return f"op aten::{op} in {where} has no ONNX translation; replace it or compute it outside the model"
    return f"op aten::{candidates[0]} has no ONNX translation (its module could not be located)"
