"""Training: an Accelerate loop for (distributed) retraining and a transformers `Trainer` with
the S4 parameter groups."""

from .accelerate_trainer import RunFolderError, TrainingConfig, TrainResult, evaluate_model, latest_checkpoint, train

__all__ = ["RunFolderError", "TrainResult", "TrainingConfig", "evaluate_model", "latest_checkpoint", "train"]
