"""Stop a run that is not learning, instead of shipping it: a model at chance, or a loss that never fell.

A stage that stays at chance (a dead network: every ReLU off, one class predicted) still "finishes"
and would hand its chance-level model to the next stage of a chain or to export. The trainer looks
at every epoch's record and raises :class:`NotLearning` when

* **at chance**: the best validation top-1 so far (train top-1 when there is no validation split)
  is at most ``CHANCE_FACTOR`` times chance, 100 / classes percent (12% for 10 classes, 1.2% for
  100), at the end of the run, or earlier from the second epoch on while the whole training loss
  has not fallen below ``MID_RUN_FALL`` of its first epoch's. A run whose loss falls is judged at
  its end: a scheme that first regresses features (the teacher-class network) sits at chance
  while its loss falls, and so does a feature method at a large weight before its cross-entropy
  starts to fall (AT at weight 1000 on digits: at chance with a flat CE for two epochs, 85% at
  fifteen). A dead network's whole loss is flat (27.9 -> 27.8 on Fashion-MNIST);
* **the loss never fell**: at the end of a run of two or more epochs, no epoch's training loss is
  below ``FALL_RATIO`` times the first epoch's. The cross-entropy term is judged when the scheme
  reports one (knowledge terms may rise by design, e.g. DKD's weight warm-up), else the total.

``TrainConfig.stop_when_not_learning = False`` turns it off (a study of failure modes).
"""

from __future__ import annotations

from typing import Any

from compressor.errors import UserError

CHANCE_FACTOR = 1.2
FALL_RATIO = 0.99
FIRST_CHANCE_CHECK = 2  # epochs: one epoch of a slow start is not yet a dead run
MID_RUN_FALL = 0.9


class NotLearning(UserError):
    """The run stopped because it was not learning; ``reason`` is the one-line diagnosis."""

    def __init__(self, reason: str, epoch: int, epochs: int) -> None:
        super().__init__(f"training is not learning: {reason} (epoch {epoch} of {epochs}); "
                         "try a lower learning rate, and check that the labels belong to the images")
        self.reason, self.epoch, self.epochs = reason, epoch, epochs


def _watched_loss(record: dict[str, Any]) -> float | None:
    terms = record.get("loss_terms") or {}
    value = terms.get("ce", record.get("loss"))
    return None if value is None else float(value)


def _accuracy(record: dict[str, Any]) -> tuple[str, float | None]:
    if record.get("val_top1") is not None:
        return "validation", float(record["val_top1"])
    value = record.get("train_top1")
    return "training", None if value is None else float(value)


def not_learning_reason(history: list[dict[str, Any]], num_classes: int, epochs: int) -> str | None:
    """Why the run recorded in ``history`` (one record per finished epoch) is not learning, or None."""
    done = len(history)
    if done == 0 or num_classes < 2:
        return None
    chance = 100.0 / num_classes
    if done == epochs or (done >= FIRST_CHANCE_CHECK and not _fell(history, MID_RUN_FALL, total=True)):
        split, best = None, None
        for record in history:
            split, value = _accuracy(record)
            if value is not None:
                best = value if best is None else max(best, value)
        if best is not None and best <= CHANCE_FACTOR * chance:
            return (f"best {split} top-1 {best:.2f}% is at chance ({chance:.1f}% for {num_classes} classes)"
                    f"{_loss_trend(history)}")
    if done == epochs and done >= 2 and not _fell(history, FALL_RATIO):
        first = _watched_loss(history[0])
        lowest = min(v for v in map(_watched_loss, history[1:]) if v is not None)
        name = "cross-entropy" if "ce" in (history[0].get("loss_terms") or {}) else "training loss"
        return f"the {name} never fell below its first epoch's {first:.4g} (lowest later {lowest:.4g})"
    return None


def _fell(history: list[dict[str, Any]], ratio: float, *, total: bool = False) -> bool:
    """Whether a later epoch's watched loss (``total``: the whole training loss) is below ``ratio``
    times the first epoch's (True when unknown)."""
    pick = (lambda r: r.get("loss")) if total else _watched_loss
    first = pick(history[0])
    later = [v for v in map(pick, history[1:]) if v is not None]
    return first is None or not later or min(later) < ratio * first


def _loss_trend(history: list[dict[str, Any]]) -> str:
    first, last = history[0].get("loss"), history[-1].get("loss")
    if first is None or last is None:
        return ""
    return f"; training loss {float(first):.4g} -> {float(last):.4g}"


def check_learning(history: list[dict[str, Any]], num_classes: int, epochs: int) -> None:
    """Raise :class:`NotLearning` when :func:`not_learning_reason` finds a reason."""
    reason = not_learning_reason(history, num_classes, epochs)
    if reason is not None:
        raise NotLearning(reason, len(history), epochs)
