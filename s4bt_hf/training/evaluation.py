"""Loss and metrics of a model on a dataset (`evaluate_dataset`), by the one evaluation loop of
`s4bt_hf.evaluation_s4dss` (re-exported here)."""

from __future__ import annotations

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..evaluation_s4dss import evaluation_metrics, metric_sums, problem_metrics

__all__ = ["evaluate_dataset", "evaluation_metrics", "metric_sums", "problem_metrics"]


def evaluate_dataset(model, dataset, batch_size: int = 64, collate_fn=None, progress: bool = False,
                     description: str = "evaluate") -> dict:
    """{"samples", "loss", and the problem type's metrics (`evaluation_metrics`)} of `model`
    (switched to eval mode) on `dataset`."""
    if len(dataset) == 0:
        raise ValueError("the dataset to evaluate is empty (0 samples).")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    device = next(model.parameters()).device
    return evaluation_metrics(model, tqdm(loader, desc=description, disable=not progress), device=device)
