"""Training: an Accelerate loop for (distributed) retraining and a transformers `Trainer` with
the S4 parameter groups."""

from .accelerate_trainer import RunFolderError, TrainingConfig, TrainResult, evaluate_model, latest_checkpoint, train
from .evaluation import evaluate_dataset
from .hf_trainer import S4DSSTrainer

__all__ = [
    "RunFolderError",
    "S4DSSTrainer",
    "TrainResult",
    "TrainingConfig",
    "evaluate_dataset",
    "evaluate_model",
    "latest_checkpoint",
    "train",
]
