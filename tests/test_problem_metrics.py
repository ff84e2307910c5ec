"""The metrics of every problem type, in the evaluation loop and as the Trainer's compute_metrics,
against numpy computed by hand."""

import numpy as np
import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.data.collate import PadCollator
from s4bt_hf.metrics import compute_metrics_for
from s4bt_hf.training.evaluation import evaluation_metrics


def batches_and_model(problem_type, num_labels, labels):
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=4, n_layers=1, d_state=2,
                                                       num_labels=num_labels, problem_type=problem_type)).eval()
    values = torch.randn(len(labels), 6, 1, generator=torch.Generator().manual_seed(1))
    collate = PadCollator()
    examples = [{"input_values": values[index], "labels": labels[index]} for index in range(len(labels))]
    return model, [collate(examples[:3]), collate(examples[3:])], values


def test_regression_mse_and_mae():
    targets = np.array([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0], [-3.0, 0.5], [0.0, 0.0]])
    model, batches, values = batches_and_model("regression", 2, targets.tolist())
    metrics = evaluation_metrics(model, batches)
    with torch.no_grad():
        predicted = model(input_values=values).logits.double().numpy()
    assert metrics["mse"] == pytest.approx(np.mean((predicted - targets) ** 2), rel=1e-5)
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(predicted - targets)), rel=1e-5)
    assert "accuracy" not in metrics
    assert compute_metrics_for("regression")((predicted, targets)) == pytest.approx(
        {"mse": np.mean((predicted - targets) ** 2), "mae": np.mean(np.abs(predicted - targets))})


def test_multi_label_f1_and_exact_match():
    targets = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=float)
    model, batches, values = batches_and_model("multi_label_classification", 3, targets.tolist())
    with torch.no_grad():
        predicted = (model(input_values=values).logits.numpy() > 0).astype(float)
    tp = (predicted * targets).sum()
    fp = (predicted * (1 - targets)).sum()
    fn = ((1 - predicted) * targets).sum()
    expected = {"f1": 2 * tp / (2 * tp + fp + fn), "exact_match": np.mean((predicted == targets).all(1))}
    metrics = evaluation_metrics(model, batches)
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)
    logits = np.where(predicted > 0, 2.0, -2.0)
    assert compute_metrics_for("multi_label_classification")((logits, targets)) == pytest.approx(expected)
    assert compute_metrics_for("multi_label_classification")((np.full((2, 2), -1.0), np.zeros((2, 2)))) == {
        "f1": 1.0, "exact_match": 1.0}


def test_single_label_accuracy_and_a_batch_without_labels():
    model, batches, values = batches_and_model(None, 3, [0, 2, 1, 1, 0])
    with torch.no_grad():
        predicted = model(input_values=values).logits.argmax(-1).numpy()
    assert evaluation_metrics(model, batches)["accuracy"] == pytest.approx(np.mean(predicted == [0, 2, 1, 1, 0]))
    with pytest.raises(KeyError, match="has no `labels` \\(it has input_values\\)"):
        evaluation_metrics(model, [{"input_values": values}])
    with pytest.raises(ValueError, match="unknown problem type"):
        compute_metrics_for("ranking")
