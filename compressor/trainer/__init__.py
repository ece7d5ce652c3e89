"""The one trainer: every scheme trains through :func:`fit` (see loop.py for what it owns)."""

from compressor.trainer.config import TrainConfig
from compressor.trainer.distributed import DistContext, resolve_device, session
from compressor.trainer.evaluate import EvalResult, evaluate, evaluate_many
from compressor.trainer.learning_guard import NotLearning
from compressor.trainer.loop import TrainingDiverged, TrainResult, fit
from compressor.trainer.optim import OPTIMIZERS, build_optimizer, register_optimizer
from compressor.trainer.schedule import SCHEDULES, LrSchedule, register_schedule
from compressor.trainer.seeding import seed_everything
from compressor.trainer.state import default_state_path, load_state

__all__ = [
    "DistContext",
    "EvalResult",
    "LrSchedule",
    "NotLearning",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "default_state_path",
    "evaluate",
    "evaluate_many",
    "fit",
    "load_state",
    "register_optimizer",
    "register_schedule",
    "resolve_device",
    "seed_everything",
    "session",
]
