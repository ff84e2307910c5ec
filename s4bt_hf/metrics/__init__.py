"""Metrics that work offline.

`evaluate.load("accuracy")` needs the Hugging Face Hub. `load_accuracy()` loads this package's
own copy of the metric (`s4bt_accuracy/`) by absolute path instead, which also works with
`HF_HUB_OFFLINE=1`. `compute_accuracy_metrics` plugs it into `Trainer(compute_metrics=...)`.
"""

from __future__ import annotations

import functools
import os

import numpy as np

ACCURACY_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s4bt_accuracy")


def load_accuracy(**kwargs):
    """The package's accuracy metric, an `evaluate.Metric` (`compute(predictions=, references=)` ->
    `{"accuracy": float}`). `kwargs` go to `evaluate.load` (e.g. `keep_in_memory=True`,
    `experiment_id=...`)."""
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, **kwargs)


@functools.lru_cache(maxsize=1)
def _in_memory_accuracy():
    # in memory: no Arrow cache files, so processes that evaluate at once cannot collide
    return load_accuracy(keep_in_memory=True)


def compute_accuracy_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for the transformers `Trainer`: accuracy of the argmax of the logits.

    `eval_pred` is an `EvalPrediction` (or a `(predictions, label_ids)` pair). Its predictions
    may be a tuple whose first element is the logits (when the model also returns hidden
    states), or class ids already (when `preprocess_logits_for_metrics` took the argmax).
    """
    predictions, labels = _predictions_and_labels(eval_pred)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if predictions.ndim > 1:
        predictions = predictions.argmax(axis=-1)
    predictions = predictions.reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"compute_accuracy_metrics: {predictions.shape[0]} predictions but {labels.shape[0]} labels."
        )
    return _in_memory_accuracy().compute(predictions=predictions.astype(np.int64), references=labels.astype(np.int64))


def compute_metrics_for(problem_type: str | None):
    """`compute_metrics` for the transformers `Trainer` by problem type: accuracy for single-label
    classification (`compute_accuracy_metrics`), MSE and MAE for regression, micro F1 and exact
    match for multi-label classification — the metrics the Accelerate loop reports
    (`s4bt_hf.training.evaluation.problem_metrics`)."""
    if problem_type in (None, "single_label_classification"):
        return compute_accuracy_metrics
    if problem_type not in ("regression", "multi_label_classification"):
        raise ValueError(f"compute_metrics_for: unknown problem type {problem_type!r}.")

    def compute(eval_pred) -> dict[str, float]:
        import torch

        from ..training.evaluation import metric_sums, problem_metrics

        predictions, labels = _predictions_and_labels(eval_pred)
        logits = torch.as_tensor(np.asarray(predictions), dtype=torch.float64)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(f"compute_metrics: {logits.shape[0]} predictions but {labels.shape[0]} labels.")
        return problem_metrics(problem_type, metric_sums(problem_type, logits, labels), labels.shape[0])

    return compute


def _predictions_and_labels(eval_pred):
    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, labels = eval_pred
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    return predictions, labels


__all__ = ["ACCURACY_METRIC_PATH", "compute_accuracy_metrics", "compute_metrics_for", "load_accuracy"]
