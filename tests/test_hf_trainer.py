"""The transformers Trainer with the S4 parameter groups (`S4DSSTrainer`) and the offline
accuracy metric (`s4bt_hf.metrics`)."""

import functools
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import EvalPrediction, TrainerCallback, TrainingArguments

from s4bt_hf import S4DSSForSequenceClassification, S4DSSPreTrainedModel
from s4bt_hf.metrics import ACCURACY_METRIC_PATH, compute_accuracy_metrics, load_accuracy
from s4bt_hf.modeling_s4dss import SSM_DYNAMICS_PARAMETER_NAMES
from s4bt_hf.training.hf_trainer import S4DSSTrainer

LENGTH, INPUT_DIM, NUM_LABELS = 16, 2, 3


def _dataset(num_examples, seed=0):
    """Real-valued sequences whose class is the sign pattern of the channel means (learnable)."""
    generator = np.random.default_rng(seed)
    inputs = generator.standard_normal((num_examples, LENGTH, INPUT_DIM)).astype(np.float32)
    means = inputs.mean(axis=1)
    labels = np.where(means[:, 0] > 0, 1, 0) + np.where(means[:, 1] > 0.2, 1, 0)
    return Dataset.from_dict({"input_values": inputs, "labels": labels.astype(np.int64)}).with_format("torch")


def _model(real_config, **overrides):
    torch.manual_seed(0)
    fields = {"input_dim": INPUT_DIM, "num_labels": NUM_LABELS, "ssm_lr": 2e-3, "ssm_weight_decay": 0.0}
    fields.update(overrides)
    return S4DSSForSequenceClassification(real_config(**fields))


def _args(tmp_path, **overrides):
    fields = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "label_names": ["labels"],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    fields.update(overrides)
    return TrainingArguments(**fields)


def _groups_by_name(optimizer):
    return {group["name"]: group for group in optimizer.param_groups}


def test_optimizer_has_the_three_s4_groups(real_config, tmp_path):
    model = _model(real_config)
    trainer = S4DSSTrainer(model=model, args=_args(tmp_path, learning_rate=3e-3, weight_decay=0.01))
    optimizer = trainer.create_optimizer()

    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay", "ssm"]  # main group first
    groups = _groups_by_name(optimizer)
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (3e-3, 0.01)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (3e-3, 0.0)
    assert (groups["ssm"]["lr"], groups["ssm"]["weight_decay"]) == (2e-3, 0.0)
    # the optimizer class and its kwargs still come from TrainingArguments
    assert isinstance(optimizer, torch.optim.AdamW)
    assert groups["decay"]["betas"] == (trainer.args.adam_beta1, trainer.args.adam_beta2)

    grouped = [id(param) for group in optimizer.param_groups for param in group["params"]]
    assert sorted(grouped) == sorted(id(param) for param in model.parameters())  # every parameter exactly once
    names = {id(param): name for name, param in model.named_parameters()}
    ssm_names = {names[id(param)] for param in groups["ssm"]["params"]}
    assert ssm_names == {
        name for name in names.values()
        if ".kernel." in name and name.rsplit(".", 1)[-1] in SSM_DYNAMICS_PARAMETER_NAMES
    }
    no_decay_names = {names[id(param)] for param in groups["no_decay"]["params"]}
    assert no_decay_names == {name for name in names.values() if name.endswith("bias") or ".norm." in name
                              or "final_norm" in name}
    assert "s4dss.layers.0.norm.weight" in no_decay_names and "classifier.bias" in no_decay_names
    decay_names = {names[id(param)] for param in groups["decay"]["params"]}
    assert "classifier.weight" in decay_names and not any(name.endswith("bias") for name in decay_names)
    # the kernel's output vector and skip term are ordinary weights
    assert {"s4dss.layers.0.kernel.C", "s4dss.layers.0.kernel.D"} <= decay_names


def test_scheduler_scales_each_group_from_its_own_lr_and_logs_the_main_lr(real_config, tmp_path):
    model = _model(real_config)
    seen = []

    class RecordLearningRates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([(group["initial_lr"], group["lr"]) for group in optimizer.param_groups])

    args = _args(tmp_path, learning_rate=3e-3, max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                 lr_scheduler_type="linear", warmup_steps=0)
    trainer = S4DSSTrainer(model=model, args=args, train_dataset=_dataset(32), callbacks=[RecordLearningRates()])
    trainer.train()

    assert len(seen) == 4
    for step, rates in enumerate(seen, start=1):
        assert [initial for initial, _ in rates] == [3e-3, 3e-3, 2e-3]
        for initial, current in rates:
            assert current == pytest.approx(initial * (4 - step) / 4, rel=1e-9, abs=1e-15)
    # the logged learning rate (the one each step used) is group 0's, the main group's; not ssm_lr
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([3e-3 * (4 - step) / 4 for step in range(4)])


def test_create_optimizer_groups_the_model_inside_a_wrapper(real_config, tmp_path):
    model = _model(real_config)
    trainer = S4DSSTrainer(model=model, args=_args(tmp_path))
    optimizer = trainer.create_optimizer(torch.nn.DataParallel(model))
    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay", "ssm"]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


def test_trainer_rejects_a_model_that_is_not_s4dss(tmp_path):
    class NotS4(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, input_values, labels=None):
            return {"logits": self.linear(input_values)}

    with pytest.raises(TypeError, match="S4DSSTrainer trains S4-DSS models"):
        S4DSSTrainer(model=NotS4(), args=_args(tmp_path))


def _model_with_spread_classifier(real_config):
    """O(1) classifier weights, so that every layer gets a gradient that moves it visibly."""
    model = _model(real_config)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return model


def _train_weights(real_config, tmp_path, batch_size, accumulation):
    model = _model_with_spread_classifier(real_config)
    args = _args(
        tmp_path / f"bs{batch_size}ga{accumulation}",
        optim="sgd",
        learning_rate=0.02,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: it would hide a wrongly scaled gradient
        num_train_epochs=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",  # same order in both runs
    )
    trainer = S4DSSTrainer(model=model, args=args, train_dataset=_dataset(32))
    trainer.train()
    assert trainer.state.global_step == 2
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _max_difference(weights, other):
    return max((weights[name] - other[name]).abs().max().item() for name in weights)


def test_gradient_accumulation_matches_the_large_batch(real_config, tmp_path, monkeypatch):
    start = _model_with_spread_classifier(real_config)
    initial = {name: param.detach().clone() for name, param in start.named_parameters()}
    large_batch = _train_weights(real_config, tmp_path, batch_size=16, accumulation=1)
    accumulated = _train_weights(real_config, tmp_path, batch_size=8, accumulation=2)
    assert _max_difference(large_batch, initial) > 1e-2  # the steps did move the weights
    # equal up to float32 rounding (summing two half-batch means instead of one mean)
    torch.testing.assert_close(accumulated, large_batch, rtol=1e-6, atol=1e-6)

    # The equality rests on `accepts_loss_kwargs = False`: with True, the Trainer believes the model
    # normalised its loss by `num_items_in_batch` and stops dividing it by the accumulation steps.
    # Simulate a forward that takes (and ignores) loss kwargs, as a `**kwargs` forward would.
    forward = S4DSSForSequenceClassification.forward

    @functools.wraps(forward)
    def forward_taking_loss_kwargs(self, *args, num_items_in_batch=None, **kwargs):
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(S4DSSPreTrainedModel, "accepts_loss_kwargs", True)
    monkeypatch.setattr(S4DSSForSequenceClassification, "forward", forward_taking_loss_kwargs)
    over_scaled = _train_weights(real_config, tmp_path / "loss_kwargs", batch_size=8, accumulation=2)
    # updates twice as large: off by about one whole update
    assert _max_difference(over_scaled, large_batch) > 0.5 * _max_difference(large_batch, initial)


def test_accuracy_metric_loads_offline_by_path():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert os.path.isabs(ACCURACY_METRIC_PATH)
    assert os.path.isfile(os.path.join(ACCURACY_METRIC_PATH, "s4bt_accuracy.py"))
    metric = load_accuracy()
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[2], references=[2])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_compute_accuracy_metrics_on_eval_predictions():
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]], dtype=np.float32)
    labels = np.array([1, 0, 0, 1])
    assert compute_accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.75}
    # logits with extra model outputs (a tuple), and class ids from preprocess_logits_for_metrics
    hidden = np.zeros((4, 16, 8), dtype=np.float32)
    assert compute_accuracy_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=labels)) == {
        "accuracy": 0.75
    }
    assert compute_accuracy_metrics(EvalPrediction(predictions=logits.argmax(-1), label_ids=labels)) == {
        "accuracy": 0.75
    }
    with pytest.raises(ValueError, match="predictions"):
        compute_accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels[:3]))


def test_train_and_evaluate_end_to_end(real_config, tmp_path):
    model = _model(real_config)
    train, validation = _dataset(64, seed=0), _dataset(24, seed=1)
    args = _args(tmp_path, learning_rate=1e-2, num_train_epochs=2, per_device_train_batch_size=16,
                 eval_strategy="epoch", per_device_eval_batch_size=10)
    trainer = S4DSSTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                           compute_metrics=compute_accuracy_metrics)
    trainer.train()
    metrics = trainer.evaluate()

    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert sum("eval_accuracy" in entry for entry in trainer.state.log_history) == 3  # 2 epochs + final
    # the same accuracy computed by hand from the trained model
    model.eval()
    with torch.no_grad():
        logits = model(input_values=validation[:]["input_values"]).logits
    expected = (logits.argmax(-1) == validation[:]["labels"]).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected)
