"""Training: an Accelerate loop for (distributed) retraining and a transformers `Trainer` with
the S4 parameter groups."""

from .accelerate_trainer import (
    CheckpointError,
    NonFiniteLossError,
    RunFolderError,
    RunWriteError,
    TrainingConfig,
    TrainResult,
    evaluate_model,
    latest_checkpoint,
    train,
)
from .evaluation import evaluate_dataset
from .hf_trainer import ReductionCallback, S4DSSTrainer
from .reduction_schedule import ReductionSchedule

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "ReductionCallback",
    "ReductionSchedule",
    "RunFolderError",
    "RunWriteError",
    "S4DSSTrainer",
    "TrainResult",
    "TrainingConfig",
    "evaluate_dataset",
    "evaluate_model",
    "latest_checkpoint",
    "train",
]
