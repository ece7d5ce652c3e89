"""What ``fit`` does before the main run: bind the training labels, and run an init phase.

Two-stage methods (FSP; RepDistiller also runs AB and factor transfer this way) first train in an
initialisation phase on their own loss, then train as usual. RepDistiller (train_student.py with
helper/pretrain.py ``init``) runs ``--init_epochs`` (30) epochs of SGD at the run's learning rate,
momentum and weight decay with no schedule, and builds a fresh optimiser for the main run. Here a
scheme asks for it with ``Scheme.init_phase_epochs()``; this module then trains those epochs
through the same per-epoch machinery as the main run (``loop._Run``: device, precision, DDP, NaN
guard, per-epoch state and exact resume), with:

* the run's config but ``epochs`` = the init epochs, a constant learning rate (no warm-up, no
  plateau cuts) and no model selection (``select: last``): the phase has no validation or test
  pass, it only prepares the weights the main run starts from;
* its own state and log files beside the main run's (``state.init.pt``, ``log.init.jsonl``),
  so a run stopped inside the init phase resumes inside it, exactly;
* echo lines prefixed ``init phase:``; ``config.extra["phase"]`` is ``"init"`` during it.

Once the main run has saved a state, resuming skips the init phase: that state holds the
initialised weights. The main run then builds its own optimiser and schedule, as RepDistiller's.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any, Callable

from compressor.schemes.base import Scheme
from compressor.trainer.config import TrainConfig
from compressor.trainer.distributed import DistContext

INIT, MAIN = "init", "main"


def bind_train_labels(scheme: Scheme, source: Any) -> None:
    """Hand the training split's labels to the scheme (for class-aware losses: CRD's negatives)."""
    targets, bind = getattr(source, "targets", None), getattr(scheme, "bind_train_labels", None)
    if callable(targets) and callable(bind):
        bind(targets("train"))


def init_config(config: TrainConfig, epochs: int) -> TrainConfig:
    """The init phase's recipe: the run's optimiser at a constant rate for ``epochs`` epochs.

    The learning guard is off: the classifier does not train in this phase, so accuracy at
    chance is expected (the main run that follows is guarded as usual). ``extra["phase"] =
    "init"`` tells any other per-epoch check which phase it is watching.
    """
    return dataclasses.replace(config, epochs=epochs, schedule="constant", milestones=(), warmup_epochs=0,
                               plateau_patience=0, select="last", stop_when_not_learning=False,
                               extra={**config.extra, "phase": INIT})


def sibling(path: str | Path | None, tag: str) -> Path | None:
    """``state.pt`` -> ``state.init.pt``: the init phase's file beside the main run's."""
    if path is None:
        return None
    path = Path(path)
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def run_init_phase(scheme: Scheme, source: Any, config: TrainConfig, *, state_path: str | Path | None,
                   log_path: str | Path | None, resume: bool, echo: Callable[[str], None] | None,
                   ctx: DistContext) -> int:
    """Train the scheme's init phase if it has one (and it is not done); returns its epochs run now."""
    from compressor.trainer.loop import _Run  # loop imports this module

    asked = getattr(scheme, "init_phase_epochs", None)
    epochs = int(asked()) if callable(asked) else 0
    if epochs <= 0:
        return 0
    say = (lambda msg: echo(f"init phase: {msg}")) if echo is not None else None
    if resume and state_path is not None and Path(state_path).is_file():
        scheme.set_phase(MAIN)  # the main run had begun: its state holds the initialised weights
        return 0
    scheme.set_phase(INIT)
    run = _Run(scheme, _TrainOnly(source), init_config(config, epochs), state_path=sibling(state_path, INIT),
               log_path=sibling(log_path, INIT), ctx=ctx, echo=say)
    run.start(resume)
    done = 0
    try:
        for epoch in range(run.start_epoch, epochs):
            run.epoch(epoch)
            done += 1
    finally:
        run.tap.close()
    del run  # and with it any DDP wrapper, whose gradient hooks must not outlive the phase
    gc.collect()
    scheme.set_phase(MAIN)
    return done


class _TrainOnly:
    """The data as the init phase sees it: the training split only (no validation, no test)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def split_size(self, split: str) -> int:
        return self._source.split_size(split) if split == "train" else 0

    def to(self, device: Any) -> "_TrainOnly":
        self._source.to(device)
        return self
