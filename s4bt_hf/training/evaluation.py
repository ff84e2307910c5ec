"""Loss and accuracy of a model on a dataset: one evaluation loop, used in one process
(`evaluate_dataset`, `s4bt evaluate`, the paper's experiment) and by the Accelerate trainer
(`evaluate_model`, which gathers over processes)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..validation_s4dss import per_sample_loss, prepare_labels


@torch.no_grad()
def evaluation_metrics(model, batches, gather=None, config=None, device=None) -> dict:
    """{"loss", "samples"[, "accuracy"]} over `batches` (dicts with `labels`), with the loss the
    model trains with (the same problem type and loss), summed per sample; `gather` (e.g.
    `accelerator.gather_for_metrics`) collects (logits, labels) from all processes. Refuses an
    empty evaluation set (no accuracy exists over 0 samples)."""
    config = config if config is not None else model.config
    model.eval()
    correct, count, loss_sum, classification = 0, 0, 0.0, None
    for batch in batches:
        if device is not None:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = model(**batch).logits
        labels = batch["labels"]
        if gather is not None:
            logits, labels = gather((logits, labels))
        problem, labels = prepare_labels(labels, logits.float(), config.problem_type, check_values=False)
        classification = problem == "single_label_classification"
        loss_sum += per_sample_loss(problem, logits.float(), labels).sum().item()
        if classification:
            correct += (logits.argmax(-1) == labels).sum().item()
        count += labels.shape[0]
    if count == 0:
        raise ValueError("the evaluation set is empty (0 samples): there is no loss or accuracy to report.")
    metrics = {"loss": loss_sum / count, "samples": count}
    if classification:
        metrics["accuracy"] = correct / count
    return metrics


def evaluate_dataset(model, dataset, batch_size: int = 64, collate_fn=None, progress: bool = False,
                     description: str = "evaluate") -> dict:
    """{"samples", "loss", "accuracy"} of `model` (switched to eval mode) on `dataset`."""
    if len(dataset) == 0:
        raise ValueError("the dataset to evaluate is empty (0 samples).")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    device = next(model.parameters()).device
    return evaluation_metrics(model, tqdm(loader, desc=description, disable=not progress), device=device)
