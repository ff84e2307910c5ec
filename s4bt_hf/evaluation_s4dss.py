"""The metrics of a model over batches with labels, per problem type: one evaluation loop, used in
one process (`training.evaluate_dataset`, `s4bt evaluate`, the experiments), by the Accelerate
trainer (which gathers over processes) and by `shrink` (which compares candidates on validation).

This file is copied into saved checkpoints (remote code): it imports only torch and siblings.
"""

from __future__ import annotations

import torch

from .validation_s4dss import per_sample_loss, prepare_labels


@torch.no_grad()
def evaluation_metrics(model, batches, gather=None, config=None, device=None) -> dict:
    """{"loss", "samples", ...} over `batches` (dicts with `labels`), with the loss the model trains
    with (the same problem type and loss), summed per sample, and the metrics of the problem type
    (`problem_metrics`): accuracy for single-label classification, MSE and MAE for regression,
    micro F1 and exact match for multi-label classification. `gather` (e.g.
    `accelerator.gather_for_metrics`) collects (logits, labels) from all processes. Refuses an
    empty evaluation set (no metric exists over 0 samples)."""
    config = config if config is not None else model.config
    model.eval()
    count, loss_sum, problem, sums = 0, 0.0, None, {}
    for batch in batches:
        if device is not None:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
        if "labels" not in batch:
            raise KeyError(f"an evaluation batch has no `labels` (it has {', '.join(batch)}); name the label "
                           "column `labels` (or `label`)")
        logits = model(**batch).logits
        labels = batch["labels"]
        if gather is not None:
            logits, labels = gather((logits, labels))
        problem, labels = prepare_labels(labels, logits.float(), config.problem_type, check_values=False)
        loss_sum += per_sample_loss(problem, logits.float(), labels).sum().item()
        for name, value in metric_sums(problem, logits.float(), labels).items():
            sums[name] = sums.get(name, 0.0) + value
        count += labels.shape[0]
    if count == 0:
        raise ValueError("the evaluation set is empty (0 samples): there is no loss or accuracy to report.")
    return {"loss": loss_sum / count, "samples": count, **problem_metrics(problem, sums, count)}


def metric_sums(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The additive pieces of the metrics of one batch (summed over batches, then finished by
    `problem_metrics`, so batch sizes and processes do not weight them)."""
    if problem == "single_label_classification":
        return {"correct": (logits.argmax(-1) == labels).sum().item()}
    if problem == "regression":
        error = (logits.reshape(labels.shape) - labels).reshape(labels.shape[0], -1)
        return {"squared": error.square().mean(1).sum().item(), "absolute": error.abs().mean(1).sum().item()}
    predicted = logits > 0  # sigmoid(logit) > 0.5
    truth = labels > 0.5
    return {"true_positive": (predicted & truth).sum().item(), "false_positive": (predicted & ~truth).sum().item(),
            "false_negative": (~predicted & truth).sum().item(),
            "exact": (predicted == truth).all(-1).sum().item()}


def problem_metrics(problem: str | None, sums: dict, count: int) -> dict:
    """accuracy = correct / n; mse = Σ mean_j (ŷ_ij − y_ij)² / n, mae likewise with |·|;
    micro F1 = 2 TP / (2 TP + FP + FN) (1.0 when there is nothing to find and nothing found),
    exact match = rows whose every label is right / n."""
    if problem == "single_label_classification":
        return {"accuracy": sums["correct"] / count}
    if problem == "regression":
        return {"mse": sums["squared"] / count, "mae": sums["absolute"] / count}
    if problem == "multi_label_classification":
        denominator = 2 * sums["true_positive"] + sums["false_positive"] + sums["false_negative"]
        return {"f1": 1.0 if denominator == 0 else 2 * sums["true_positive"] / denominator,
                "exact_match": sums["exact"] / count}
    return {}
