"""The per-epoch training state behind ``--resume``, written atomically.

Everything in it loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists
and dicts, no pickled objects. It holds what an epoch boundary needs to continue exactly: the
scheme's ``state_dict`` (every model and learnable loss part), the optimiser (momentum buffers),
the grad scaler, the schedule's plateau counters, the best-on-validation weights so far, the
metric history and the config and seed it was made with. Generator states are not needed: every
epoch re-seeds from (seed, epoch, rank), see :mod:`compressor.trainer.seeding`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from compressor.checkpoint import _short, _unsafe_global, atomic_torch_save, check_zip_integrity
from compressor.errors import UserError

STATE_FORMAT = "kdcompress-train-state"
STATE_VERSION = 1


def default_state_path(output: str | os.PathLike[str]) -> Path:
    """Where ``train -o X.pt`` keeps its resumable state: ``X.pt.state``."""
    return Path(str(output) + ".state")


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    atomic_torch_save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, path)


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training state, or raise a UserError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no training state at {path}: nothing to resume (drop --resume to start afresh)")
    check_zip_integrity(path)  # torch.load would read damaged bytes as weights without a word
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, foreign, a pickle that would run code, or not a torch file at all
        text = str(err)
        unsafe = _unsafe_global(text)  # torch's refusal of a global is a page of advice: name the global
        detail = f"it would import {unsafe.strip(' ()')}, which a state never holds" if unsafe else \
            f"{type(err).__name__}: {_short(text)}"
        raise UserError(f"cannot read the training state {path} ({detail}); "
                        "delete it and train without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a kdcompress training state; delete it or point -o elsewhere")
    if state.get("version", 0) > STATE_VERSION:
        raise UserError(f"{path} was written by a newer kdcompress (state version {state['version']})")
    return state
