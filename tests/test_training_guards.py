"""Training never continues on garbage (issue 12): a non-finite loss stops both loops (or is
skipped on request), best/ and final/ never hold non-finite weights, empty splits and bad
options are refused before anything is written, and a folder whose run failed before its first
checkpoint can be reused."""

import json
import os

import datasets
import pytest
import torch
from train_child import toy_dataset

import s4bt_hf
from s4bt_hf.training import NonFiniteLossError, S4DSSTrainer, TrainingConfig, evaluate_dataset, train


def tiny_model():
    torch.manual_seed(0)
    return s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(input_dim=1, d_model=8, n_layers=1, d_state=4, num_labels=2))


def config(output_dir, **changes):
    return TrainingConfig(output_dir=str(output_dir), num_epochs=1, batch_size=8, progress=False, **changes)


def poisoned(size=32, at=12):
    """The toy data set with a NaN in one input of the second batch (batch 8, no shuffling of values)."""
    data = toy_dataset(size, seed=0).with_format("numpy")
    values = data[:]["input_values"].copy()
    values[at, 3, 0] = float("nan")
    return datasets.Dataset.from_dict({"input_values": values, "labels": data[:]["labels"]}).with_format("torch")


def test_a_nan_input_stops_the_accelerate_loop_and_writes_no_model(tmp_path):
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train(tiny_model(), poisoned(), toy_dataset(16, seed=1), config(tmp_path / "run"))
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "best").exists()


def test_skip_leaves_the_bad_batch_out_and_the_weights_stay_finite(tmp_path):
    result = train(tiny_model(), poisoned(), toy_dataset(16, seed=1), config(tmp_path / "run",
                                                                               on_nonfinite_loss="skip"))
    assert result.skipped_batches == 1 and result.steps == 4
    model = s4bt_hf.S4DSSForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("skipped_nonfinite_loss" in record for record in records)


def test_non_finite_weights_are_never_saved_as_best_or_final(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")  # the loss is NaN from the first step on
    with pytest.raises(NonFiniteLossError):
        train(model, toy_dataset(16, seed=0), toy_dataset(16, seed=1), config(tmp_path / "run"))
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "final").exists()


def test_empty_splits_are_refused(tmp_path):
    empty = toy_dataset(16, seed=0).select([])
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        train(tiny_model(), toy_dataset(16, seed=0), empty, config(tmp_path / "a"))
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        train(tiny_model(), empty, None, config(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="empty"):
        evaluate_dataset(tiny_model(), empty.with_format("torch"))


@pytest.mark.parametrize("field,value,error", [
    ("batch_size", 2.5, TypeError), ("learning_rate", "1e-3", TypeError), ("num_epochs", True, TypeError),
    ("learning_rate", float("inf"), ValueError), ("max_grad_norm", 0.0, ValueError), ("seed", "a", TypeError),
    ("on_nonfinite_loss", "ignore", ValueError), ("eval_every", 0, ValueError),
])
def test_training_config_refuses_bad_types_at_once(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        TrainingConfig(output_dir=str(tmp_path / "run"), **{field: value})
    assert not (tmp_path / "run").exists()


def test_variable_length_tokens_train_without_a_collator(tmp_path):
    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1]] * 4,
                                       "labels": [0, 1, 0, 1] * 4})
    model = s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(vocab_size=10, pad_token_id=0, d_model=8, n_layers=1, d_state=4, num_labels=2))
    result = train(model, data, data, config(tmp_path / "run"))  # PadCollator by default
    assert result.steps == 2 and result.final_metrics["samples"] == 16


def test_a_folder_whose_run_failed_before_its_first_checkpoint_is_reused(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        train(tiny_model(), poisoned(at=0), toy_dataset(16, seed=1), config(run, learning_rate=0.5))
    assert (run / "run_config.json").exists()
    result = train(tiny_model(), toy_dataset(32, seed=0), toy_dataset(16, seed=1), config(run))  # other settings
    assert result.steps == 4 and (run / "final").exists()
    assert json.loads((run / "run_config.json").read_text())["training"]["learning_rate"] == 0.01


def test_the_hf_trainer_stops_at_a_non_finite_loss(tmp_path):
    from transformers import TrainingArguments

    from s4bt_hf.data import PadCollator

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=1,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = S4DSSTrainer(model=tiny_model(), args=args, train_dataset=poisoned(), data_collator=PadCollator())
    with pytest.raises(NonFiniteLossError, match="step"):
        trainer.train()
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_a_model_with_non_finite_buffers_is_not_saved_as_best(tmp_path):
    """The loss is finite (training-mode BatchNorm uses batch statistics) but the running
    statistics are not: the best model is refused."""
    torch.manual_seed(0)
    model = s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(input_dim=1, d_model=8, n_layers=1, d_state=4, num_labels=2, norm="batch"))
    model.s4dss.layers[0].norm.running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="not saving .*best.*running_var"):
        train(model, toy_dataset(16, seed=0), toy_dataset(16, seed=1), config(tmp_path / "run"))
    assert not (tmp_path / "run" / "best").exists()
