"""The Accelerate loop follows the data conventions of transformers: a `label` column, ragged
`input_values` padded by the default collator, a clear error for batches without labels, and
`best/` chosen by `metric_for_best_model` (accuracy, the loss for regression, F1 for multi-label
by default) — checked against the metric log."""

import json

import datasets
import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.training import TrainingConfig, train


def model(**fields):
    torch.manual_seed(0)
    return S4DSSForSequenceClassification(S4DSSConfig(**{"input_dim": 1, "d_model": 4, "n_layers": 1, "d_state": 2,
                                                          "num_labels": 2, **fields}))


def ragged(count=24, seed=0, label="label", kind="class"):
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_values": [], label: []}
    for index in range(count):
        values = torch.randn(5 + index % 7, 1, generator=generator) + (1.0 if index % 2 else -1.0)
        rows["input_values"].append(values.numpy())
        mean = float(values.mean())
        rows[label].append({"class": int(mean > 0), "regression": mean,
                            "multi": [float(mean > 0), float(abs(mean) > 1)]}[kind])
    return datasets.Dataset.from_dict(rows).with_format("torch")


def config(tmp_path, **changes):
    return TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=6, eval_every=1, save_every=100, batch_size=8,
                          learning_rate=0.05, progress=False, **changes)


def evaluations(tmp_path):
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        return [record for record in map(json.loads, handle) if "eval_loss" in record]


def summary(tmp_path):
    return json.loads((tmp_path / "run" / "final" / "run_summary.json").read_text())


def test_label_column_and_ragged_values_train_with_the_default_collator(tmp_path):
    result = train(model(), ragged(), ragged(seed=1), config(tmp_path))
    records = evaluations(tmp_path)
    best = max(records, key=lambda record: record["eval_accuracy"])  # the first of equal ones
    assert (result.metric_for_best_model, result.best_step) == ("accuracy", best["step"])
    assert result.best_metric == result.best_accuracy == best["eval_accuracy"]


def test_regression_keeps_the_lowest_loss_and_multi_label_the_highest_f1(tmp_path):
    train(model(num_labels=1, problem_type="regression"), ragged(kind="regression"),
          ragged(seed=1, kind="regression"), config(tmp_path / "r"))
    records = evaluations(tmp_path / "r")
    best = min(records, key=lambda record: record["eval_loss"])
    assert {"eval_mse", "eval_mae"} <= set(best)
    assert (summary(tmp_path / "r")["metric_for_best_model"], summary(tmp_path / "r")["best_step"]) == (
        "loss", best["step"])
    assert (tmp_path / "r" / "run" / "best" / "model.safetensors").is_file()

    train(model(num_labels=2, problem_type="multi_label_classification"), ragged(kind="multi"),
          ragged(seed=1, kind="multi"), config(tmp_path / "m"))
    records = evaluations(tmp_path / "m")
    best = max(records, key=lambda record: record["eval_f1"])
    assert (summary(tmp_path / "m")["metric_for_best_model"], summary(tmp_path / "m")["best_metric"]) == (
        "f1", best["eval_f1"])


def test_metric_for_best_model_is_followed_and_checked(tmp_path):
    result = train(model(), ragged(), ragged(seed=1), config(tmp_path, metric_for_best_model="loss"))
    records = evaluations(tmp_path)
    assert result.best_step == min(records, key=lambda record: record["eval_loss"])["step"]
    with pytest.raises(ValueError, match="metric_for_best_model` must be one of"):
        config(tmp_path / "x", metric_for_best_model="auc")
    with pytest.raises(ValueError, match="is 'mse', but the evaluation reports loss, accuracy"):
        train(model(), ragged(), ragged(seed=1), config(tmp_path / "y", metric_for_best_model="mse"))


def test_a_batch_without_labels_names_its_columns(tmp_path):
    data = ragged().rename_column("label", "target")
    with pytest.raises(ValueError, match=r"has no `labels` \(it has input_values"):
        train(model(), data, None, config(tmp_path))
