"""Does the ONNX file compute what the PyTorch model computes? Checked before any file is kept.

Two checks, in order: ``onnx.checker`` (a well-formed model, full check with shape inference),
then onnxruntime against PyTorch on the same real inputs: the largest absolute difference of the
logits must be within ``atol`` (default 1e-4 for fp32) and the top-1 class must agree on every
sample. Inputs are a batch from the data when the caller has one, random N(0, 1) otherwise
(inputs are already normalised, so N(0, 1) is the right scale).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn

from compressor.errors import UserError
from export.runtime import make_session, run_logits

DEFAULT_ATOL = 1e-4


class ParityError(UserError):
    """The exported graph does not match the model; carries the figures."""

    def __init__(self, message: str, result: "ParityResult") -> None:
        super().__init__(message)
        self.result = result


@dataclass
class ParityResult:
    max_abs_diff: float
    top1_agreement: float  # fraction of samples whose argmax agrees
    samples: int
    atol: float
    inputs: str  # "data" or "random"
    provider: str
    checker: str = "passed"
    min_top1: float = 1.0

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.atol and self.top1_agreement >= self.min_top1)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.atol:.0e}), "
            f"top-1 agreement {self.top1_agreement * 100:.1f}% on {self.samples} {self.inputs} inputs"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def random_inputs(input_shape: tuple[int, ...], n: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded N(0, 1) inputs of shape (n, *input_shape), for when no data is given."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_shape, generator=generator)


def run_checker(path: str | os.PathLike) -> None:
    """``onnx.checker`` with shape inference; a failure is a UserError naming the problem."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid model"
        raise UserError(f"onnx.checker rejected the exported model: {first}") from err


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Reference logits on the model's own device, in eval mode (mode restored)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        return model(x.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, top-1 agreement fraction) of two logit arrays."""
    if reference.shape != candidate.shape:
        raise UserError(f"ONNX output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return diff, agree


def check_parity(
    onnx_path: str | os.PathLike,
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    atol: float = DEFAULT_ATOL,
    min_top1: float = 1.0,
    from_data: bool = False,
    raise_on_failure: bool = True,
) -> ParityResult:
    """Checker, then onnxruntime (CPU) vs PyTorch on ``inputs``; raises ParityError with the figures."""
    run_checker(onnx_path)
    session = make_session(onnx_path)
    reference = torch_logits(model, inputs)
    candidate = run_logits(session, inputs.detach().float().cpu().numpy())
    diff, agree = compare_logits(reference, candidate)
    result = ParityResult(
        max_abs_diff=diff,
        top1_agreement=agree,
        samples=int(inputs.shape[0]),
        atol=atol,
        inputs="data" if from_data else "random",
        provider=session.get_providers()[0],
        min_top1=min_top1,
    )
    if raise_on_failure and not result.passed:
        raise ParityError(result.summary(), result)
    return result
