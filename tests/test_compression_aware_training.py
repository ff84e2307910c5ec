"""Compression-aware training: the Hankel penalty in the Accelerate loop and in S4DSSTrainer
(it reaches the weights, λ = 0 changes nothing, both terms are logged), reduction during
training (sizes, optimizer hand-off, report, bit-exact resume after SIGKILL), the CLI options,
and bad input refused before any training step."""

import json
import os

import pytest
import torch
from child_runs import run_train_child
from safetensors.torch import load_file
from train_child import toy_dataset
from transformers import TrainingArguments

import s4bt_hf
from s4bt_hf.cli import main as cli_main
from s4bt_hf.training import ReductionSchedule, S4DSSTrainer, TrainingConfig, latest_checkpoint, train
from s4bt_hf.training.reduction_schedule import reduce_during_training, swap_optimizer_parameters


def tiny_model(d_state=4, seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(d_model=6, n_layers=2, d_state=d_state, num_labels=2)
    fields.update(overrides)
    return s4bt_hf.S4DSSForSequenceClassification(s4bt_hf.S4DSSConfig(**fields))


def config(output_dir, **changes):
    fields = dict(output_dir=str(output_dir), num_epochs=1, batch_size=8, progress=False, log_every=1)
    fields.update(changes)
    return TrainingConfig(**fields)


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


# ----------------------------------------------------------------------------- the Hankel penalty in training


def test_penalty_reaches_the_weights_and_both_terms_are_logged(tmp_path):
    data = toy_dataset(48, seed=1)
    runs = {}
    for name, weight in (("default", None), ("zero", 0.0), ("penalised", 1.0)):
        model = tiny_model()
        # hankel_every without a weight is refused (issue 18): the λ = 0 run sets the weight alone
        options = {} if weight is None else {"hankel_weight": weight, "hankel_every": 2 if weight else 1}
        train(model, data, None, config(tmp_path / name, **options))
        runs[name] = (model, records(tmp_path / name))
    # λ = 0 is the loop of before, bit for bit
    default, zero = final_weights(tmp_path / "default"), final_weights(tmp_path / "zero")
    assert all(torch.equal(default[name], zero[name]) for name in default)
    # λ > 0: the penalty's gradient moved the weights, towards a smaller Hankel nuclear norm
    penalised = final_weights(tmp_path / "penalised")
    assert not torch.equal(penalised["s4dss.layers.0.kernel.C"], default["s4dss.layers.0.kernel.C"])
    with torch.no_grad():
        assert s4bt_hf.hankel_penalty(runs["penalised"][0]) < 0.97 * s4bt_hf.hankel_penalty(runs["default"][0])
    rows = [row for row in runs["penalised"][1] if "loss" in row]
    # the penalty is evaluated on steps 0, 2, 4 (before the step): logged at steps 1, 3, 5
    assert [row["step"] for row in rows if "hankel_penalty" in row] == [1, 3, 5]
    assert all("hankel_penalty" not in row for row in runs["zero"][1])
    # "loss" is the task loss alone: at step 1 (same weights, same batch) it equals the unpenalised one
    assert rows[0]["loss"] == runs["zero"][1][0]["loss"]
    assert rows[0]["hankel_penalty"] == pytest.approx(s4bt_hf.hankel_penalty(tiny_model()).item(), rel=1e-6)


# ----------------------------------------------------------------------------- reduction during training


def test_optimizer_hand_off_keeps_unchanged_moments_and_the_learning_rates():
    model = tiny_model(d_state=4)
    optimizer = torch.optim.AdamW(s4bt_hf.ssm_param_groups(model, 1e-2, 0.01))
    model(input_values=torch.randn(3, 10, 1), labels=torch.tensor([0, 1, 0])).loss.backward()
    optimizer.step()
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    kept = {name: p for name, p in model.named_parameters()}
    rates = [group["lr"] for group in optimizer.param_groups]
    reference = model.balanced_truncate(rank=2)  # a new model; `model` is reduced in place below
    replaced = reduce_during_training(model, ReductionSchedule(at=1, rank=2), step=1, total_steps=3)
    swap_optimizer_parameters(optimizer, replaced)

    assert model.config.d_state == 2 and model.s4dss.layers[1].kernel.C.shape[-2] == 2
    new_ids = {id(new) for _, new in replaced}
    names = {name for name, p in model.named_parameters() if id(p) in new_ids}
    assert names == {f"s4dss.layers.{i}.kernel.{n}" for i in (0, 1) for n in ("log_A_real", "A_imag", "B", "C")}
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, model.parameters()))
    assert [group["lr"] for group in optimizer.param_groups] == rates
    for name, parameter in model.named_parameters():
        if name in names:
            assert parameter not in optimizer.state  # fresh moments
        else:
            assert parameter is kept[name]  # log_dt, D and every other weight: the same object, same moments
            assert all(torch.equal(optimizer.state[parameter][k], v) for k, v in before[id(parameter)].items())
    # in place, the model holds exactly the weights of balanced_truncate's new model
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in reference.state_dict().items())
    model(input_values=torch.randn(3, 10, 1), labels=torch.tensor([0, 1, 0])).loss.backward()
    optimizer.step()  # trains on at the new size
    assert model.compression_report.training == {"step": 1, "total_steps": 3,
                                                 "schedule": ReductionSchedule(at=1, rank=2).to_dict()}


def test_scheduled_reduction_in_the_accelerate_loop(tmp_path):
    data = toy_dataset(48, seed=1)
    model = tiny_model(d_state=4)
    run = tmp_path / "run"
    result = train(model, data, data, config(run, num_epochs=2, reduction=ReductionSchedule(at=0.5, rank=2)))
    assert result.steps == 12
    rows = records(run)
    assert {"step": 6, "reduced_d_state": [2, 2]} in rows
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 13))  # training went on
    saved = json.loads((run / "final" / "config.json").read_text())
    assert saved["d_state"] == 2
    report = json.loads((run / "final" / "compression_report.json").read_text())
    assert report["training"]["step"] == 6 and report["training"]["total_steps"] == 12
    reloaded = s4bt_hf.S4DSSForSequenceClassification.from_pretrained(run / "final")
    assert len(reloaded.compression_report.layers[0].hankel_singular_values[0]) == 8  # σ of the 4-mode model
    assert reloaded.compression_report.training["schedule"]["rank"] == 2
    # best/ restarted at the reduction: it holds a model of the reduced size
    assert json.loads((run / "best" / "config.json").read_text())["d_state"] == 2


@pytest.mark.parametrize("schedule, method, arguments", [
    (ReductionSchedule(at=1, method="modal_truncation", rank=2, options={"match_dc": True}),
     "modal_truncation", {"rank": 2, "match_dc": True}),
    (ReductionSchedule(at=1, method="singular_perturbation", rank=[3, 2]), "singular_perturbation", {"rank": [3, 2]}),
    (ReductionSchedule(at=1, budget=18), "balanced_truncation", {"budget": 18}),
])
def test_any_reduce_method_and_a_budget_reduce_in_place_like_model_reduce(schedule, method, arguments):
    model = tiny_model(d_state=4)
    before_d = [layer.kernel.D.detach().clone() for layer in model.s4dss.layers]
    kept_d = [layer.kernel.D for layer in model.s4dss.layers]
    reference = model.reduce(method=method, **arguments)  # a new model; `model` is reduced in place below
    reduce_during_training(model, schedule, step=1, total_steps=3)
    assert model.config.layer_d_states == reference.config.layer_d_states
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in reference.state_dict().items())
    # D keeps its object (and Adam moments) but takes the method's direct term
    assert all(layer.kernel.D is d for layer, d in zip(model.s4dss.layers, kept_d, strict=True))
    moved = any(not torch.equal(layer.kernel.D, d) for layer, d in zip(model.s4dss.layers, before_d, strict=True))
    assert moved == (method != "balanced_truncation")
    report = model.compression_report
    assert report.method == method and report.training["schedule"] == schedule.to_dict()
    if "budget" in arguments:  # 18 modes = 3 per channel, split between the 2 layers by Hankel energy
        assert sum(model.config.layer_d_states) == 3 and report.budget["budget"] == 18


def test_budget_schedule_in_the_accelerate_loop(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_model(d_state=4), toy_dataset(48, seed=1), None,
                   config(run, num_epochs=2, reduction=ReductionSchedule(at=0.5, budget=0.5, method="h2",
                                                                          options={"max_iterations": 3})))
    assert result.steps == 12
    saved = json.loads((run / "final" / "config.json").read_text())
    report = json.loads((run / "final" / "compression_report.json").read_text())
    assert report["method"] == "h2" and report["training"]["schedule"]["options"] == {"max_iterations": 3}
    # half of the 2 · 6 · (2 + 4 · 6) SSM parameters, less Δ and D, at 6 · 6 per mode: 3 modes per channel
    assert sum(saved["d_state"]) == 3 and report["ssm_parameters_after"] <= 0.5 * report["ssm_parameters_before"]


def test_run_killed_after_a_reduction_resumes_to_the_same_weights(tmp_path):
    """Reduction after step 5 of 15 (rank 4 -> 2) with the Hankel penalty on; SIGKILL at the
    150th sample fetched (70 samples, 5 steps per epoch, a checkpoint every 2 steps: the latest
    complete checkpoint is one written after the reduction); the same command again ends
    bit-identical to the uninterrupted run."""
    options = ["--reduce-at", "5", "--hankel-weight", "0.05"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    first = run_train_child(str(uninterrupted), *options)
    assert first.returncode == 0, first.stderr[-3000:]
    killed = run_train_child(str(interrupted), *options, "--kill-at-sample", "150")
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = latest_checkpoint(str(interrupted))
    assert int(checkpoint.rsplit("_", 1)[1]) > 5 and os.path.exists(os.path.join(checkpoint, "reduction.json"))
    resumed = run_train_child(str(interrupted), *options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((interrupted / "final" / "run_summary.json").read_text())
    assert summary["resumed_from"] == int(checkpoint.rsplit("_", 1)[1])
    expected, actual = final_weights(uninterrupted), final_weights(interrupted)
    assert expected.keys() == actual.keys() and expected["s4dss.layers.0.kernel.C"].shape[-2] == 2
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    def strip_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert strip_time(records(uninterrupted)) == strip_time(records(interrupted))
    assert (json.loads((interrupted / "final" / "compression_report.json").read_text())["training"]
            == json.loads((uninterrupted / "final" / "compression_report.json").read_text())["training"])


# ----------------------------------------------------------------------------- bad input, before any step


@pytest.mark.parametrize("changes, match", [
    ({"hankel_weight": -0.1}, "hankel_weight"),
    ({"hankel_weight": float("nan")}, "hankel_weight"),
    ({"hankel_weight": float("inf")}, "hankel_weight"),
    ({"hankel_every": 0}, "hankel_every"),
    ({"reduction": {"at": 0.1}}, "rank"),
])
def test_bad_options_are_named(changes, match):
    with pytest.raises((TypeError, ValueError), match=match):
        TrainingConfig(output_dir="x", **changes)


@pytest.mark.parametrize("fields, match", [
    ({"at": 0, "rank": 2}, "at"), ({"at": 1.5, "rank": 2}, "at"), ({"at": True, "rank": 2}, "at"),
    ({"at": 0.1}, "exactly one"), ({"at": 0.1, "rank": 2, "tol": 0.9}, "exactly one"),
    ({"at": 0.1, "tol": 1.2}, "tol"), ({"at": 0.1, "rank": 0}, "rank"), ({"at": 0.1, "rank": 2, "method": "pca"},
                                                                         "method"),
    ({"at": 0.1, "rank": 2, "budget": 10}, "exactly one"), ({"at": 0.1, "budget": 1.5}, "budget"),
    ({"at": 0.1, "budget": True}, "budget"), ({"at": 0.1, "budget": 0}, "budget"),
    ({"at": 0.1, "rank": 2, "options": {"match_dc": True}}, "does not take option"),
    ({"at": 0.1, "rank": 2, "method": "modal_truncation", "options": {"match_dc": 1}}, "match_dc"),
    ({"at": 0.1, "rank": 2, "method": "h2", "options": {"max_iterations": -1}}, "max_iterations"),
    ({"at": 0.1, "rank": 2, "options": [("x", 1)]}, "options"),
])
def test_bad_schedules_are_named(fields, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ReductionSchedule(**fields)


@pytest.mark.parametrize("schedule, error, match", [
    (ReductionSchedule(at=7, rank=2), ValueError, "beyond the run's 6"),
    (ReductionSchedule(at=0.5, rank=5), ValueError, "raise layer 0's d_state=4"),
    (ReductionSchedule(at=0.5, rank=[2, 2, 2]), ValueError, "3 values for 2 layers"),
    (ReductionSchedule(at=0.5, budget=6 * 9), ValueError, "budget"),  # more modes than the model's 2 · 6 · 4
    (ReductionSchedule(at=0.5, budget=0.01), ValueError, "budget"),  # less than one mode per channel
])
def test_impossible_schedules_fail_before_the_run_folder_exists(tmp_path, schedule, error, match):
    run = tmp_path / "run"
    with pytest.raises(error, match=match):
        train(tiny_model(), toy_dataset(48, seed=1), None, config(run, reduction=schedule))
    assert not run.exists()


def test_a_model_that_cannot_be_reduced_is_refused():
    with pytest.raises(TypeError, match="not an S4-DSS model"):
        ReductionSchedule(at=0.5, rank=2).check_model(torch.nn.Linear(2, 2))


def test_cli_options_and_their_errors(tmp_path, capsys):
    common = ["train", "--task", "smnist", "--d-model", "4", "--n-layers", "1", "--d-state", "4",
              "--train-samples", "16", "--batch-size", "8", "--max-steps", "2", "--no-progress"]
    for extra, message in ((["--reduce-at", "0.5"], "--reduce-tol or --reduce-rank"),
                           (["--reduce-at", "5", "--reduce-rank", "2"], "beyond the run's 2"),
                           (["--hankel-weight", "-1"], "hankel_weight"),
                           (["--reduce-at", "0.5", "--reduce-rank", "2", "--reduce-option", "foo=1"], "foo"),
                           (["--reduce-at", "0.5", "--reduce-budget", "400"], "budget"),
                           (["--reduce-rank", "2"], "need --reduce-at")):
        output = tmp_path / f"bad{len(message)}"
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*common, "--output", str(output), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not output.exists()
    output = tmp_path / "good"
    assert cli_main([*common, "--output", str(output), "--reduce-at", "0.5", "--reduce-tol", "0.99",
                     "--hankel-weight", "0.01", "--hankel-every", "2", "--hankel-reuse"]) == 0
    report = json.loads((output / "final" / "compression_report.json").read_text())
    assert report["training"]["step"] == 1 and report["training"]["schedule"]["tol"] == 0.99
    assert any("hankel_penalty" in row for row in records(output))
    saved = json.loads((output / "run_config.json").read_text())["training"]
    assert (saved["hankel_weight"], saved["hankel_every"], saved["hankel_reuse"]) == (0.01, 2, True)
    output = tmp_path / "modal"
    assert cli_main([*common, "--output", str(output), "--reduce-at", "1", "--reduce-rank", "2", "--reduce-method",
                     "modal_truncation", "--reduce-option", "match_dc=true"]) == 0
    report = json.loads((output / "final" / "compression_report.json").read_text())
    assert report["method"] == "modal_truncation" and report["training"]["schedule"]["options"] == {"match_dc": True}


# ----------------------------------------------------------------------------- S4DSSTrainer


def trainer_args(tmp_path, **changes):
    fields = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                  label_names=["labels"], disable_tqdm=True, dataloader_num_workers=0, max_steps=4,
                  per_device_train_batch_size=8, logging_steps=1, learning_rate=1e-2, seed=0)
    fields.update(changes)
    return TrainingArguments(**fields)


def test_trainer_hankel_penalty_and_logs(tmp_path):
    data = toy_dataset(32, seed=1)
    weights, logs = {}, {}
    for name, options in (("plain", {}), ("zero", {"hankel_weight": 0.0}),
                          ("penalised", {"hankel_weight": 1.0, "hankel_every": 2})):
        model = tiny_model()
        trainer = S4DSSTrainer(model=model, args=trainer_args(tmp_path / name), train_dataset=data, **options)
        trainer.train()
        weights[name] = {k: v.clone() for k, v in model.state_dict().items()}
        logs[name] = [row for row in trainer.state.log_history if "loss" in row]
    assert all(torch.equal(weights["plain"][k], weights["zero"][k]) for k in weights["plain"])
    assert not torch.equal(weights["plain"]["s4dss.layers.0.kernel.C"], weights["penalised"]["s4dss.layers.0.kernel.C"])
    rows = logs["penalised"]
    assert [("hankel_penalty" in row) for row in rows] == [True, False, True, False]
    assert all("task_loss" in row for row in rows)
    # the Trainer's loss is task + weighted penalty; task_loss alone matches the unpenalised run at step 1
    assert rows[0]["task_loss"] == pytest.approx(logs["plain"][0]["loss"], rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(rows[0]["task_loss"] + 2 * rows[0]["hankel_penalty"], rel=1e-4)
    with pytest.raises(ValueError, match="hankel_every"):
        S4DSSTrainer(model=tiny_model(), args=trainer_args(tmp_path / "bad"), hankel_every=0)
    with pytest.raises(ValueError, match="hankel_weight"):
        S4DSSTrainer(model=tiny_model(), args=trainer_args(tmp_path / "bad"), hankel_weight=-1.0)


def test_trainer_reduction_callback_and_resume(tmp_path):
    data = toy_dataset(48, seed=1)
    schedule = ReductionSchedule(at=2, rank=2)
    args = dict(max_steps=5, save_strategy="steps", save_steps=3)
    model = tiny_model()
    trainer = S4DSSTrainer(model=model, args=trainer_args(tmp_path / "full", **args), train_dataset=data,
                           reduction=schedule)
    trainer.train()
    assert model.config.d_state == 2 and model.compression_report.training["step"] == 2
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    assert json.loads((checkpoint / "config.json").read_text())["d_state"] == 2
    assert (checkpoint / "compression_report.json").exists()

    resumed_model = tiny_model()  # the original model, as the same script builds it
    resumed = S4DSSTrainer(model=resumed_model, args=trainer_args(tmp_path / "full", **args), train_dataset=data,
                           reduction=schedule)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_model.config.d_state == 2
    expected, actual = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    with pytest.raises(ValueError, match="beyond the run's 5"):
        S4DSSTrainer(model=tiny_model(), args=trainer_args(tmp_path / "late", max_steps=5), train_dataset=data,
                     reduction=ReductionSchedule(at=9, rank=2)).train()
    with pytest.raises(ValueError, match="would raise"):
        S4DSSTrainer(model=tiny_model(), args=trainer_args(tmp_path / "up"), reduction=ReductionSchedule(at=1, rank=9))
