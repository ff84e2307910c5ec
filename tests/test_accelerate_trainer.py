"""The Accelerate training loop: bit-exact resume after SIGKILL, a real 2-process (gloo) run
under `accelerate launch`, run-folder protection, mixed precision."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_child import toy_dataset

import s4bt_hf
from s4bt_hf.training import RunFolderError, TrainingConfig, latest_checkpoint, train

CHILD = Path(__file__).with_name("train_child.py")


def run_child(*args, env=None, launcher=()):
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=env,
                            stdin=subprocess.DEVNULL)
    return result


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def records(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_run_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path, uninterrupted_child_run):
    """SIGKILL in the middle of a step (the data loader kills the process), start again with the
    same command: the run resumes from its latest checkpoint and ends bit-identical to a run
    that was never interrupted, with the same metric log."""
    kill_at = random.Random(2024).randint(40, 180)  # samples fetched; 70 per epoch, 3 epochs
    uninterrupted, interrupted = uninterrupted_child_run, tmp_path / "interrupted"
    killed = run_child(sys.executable, str(CHILD), str(interrupted), "--kill-at-sample", str(kill_at))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (interrupted / "final").exists()
    checkpoint = latest_checkpoint(str(interrupted))
    resumed = run_child(sys.executable, str(CHILD), str(interrupted))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((interrupted / "final" / "run_summary.json").read_text())
    expected_resume = None if checkpoint is None else int(checkpoint.rsplit("_", 1)[1])
    assert summary["resumed_from"] == expected_resume
    first, second = final_weights(uninterrupted), final_weights(interrupted)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)

    def strip_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert strip_time(records(uninterrupted)) == strip_time(records(interrupted))


def test_two_processes_under_accelerate_launch(tmp_path):
    """`accelerate launch --cpu --num_processes 2` silently runs ONE process; this is the
    launch that gives two gloo processes on a CPU machine."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = (accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no")
    output = tmp_path / "ddp"
    result = run_child(str(CHILD), str(output), "--epochs", "1", env=env, launcher=launcher)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((output / "final" / "run_summary.json").read_text())
    assert summary["num_processes"] == 2
    # 70 samples, batch 8 per process, 2 processes, accumulation 2: ceil(ceil(70/16)/2) = 3 steps
    assert summary["steps"] == 3
    # gather_for_metrics counts each of the 30 validation samples once, not the padded duplicates
    assert summary["final_metrics"]["samples"] == 30
    model = s4bt_hf.S4DSSForSequenceClassification.from_pretrained(output / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def tiny_model():
    torch.manual_seed(0)
    return s4bt_hf.S4DSSForSequenceClassification(s4bt_hf.S4DSSConfig(d_model=8, n_layers=1, d_state=4, num_labels=2))


def quick_config(output_dir, **changes):
    return TrainingConfig(output_dir=str(output_dir), num_epochs=1, batch_size=16, progress=False, **changes)


def test_run_folder_is_never_overwritten(tmp_path):
    data = toy_dataset(32, seed=0)
    run = tmp_path / "run"
    train(tiny_model(), data, data, quick_config(run))
    before = final_weights(run)
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        train(tiny_model(), data, data, quick_config(run))
    assert all(torch.equal(before[name], final_weights(run)[name]) for name in before)

    partial = tmp_path / "partial"
    (partial / "checkpoints" / "step_1").mkdir(parents=True)  # a run that has started: its checkpoint is kept
    (partial / "checkpoints" / "step_1" / "trainer_progress.json").write_text('{"step": 1}')
    (partial / "run_config.json").write_text(json.dumps(
        {"training": {**json.loads((run / "run_config.json").read_text())["training"], "learning_rate": 0.5},
         "model": tiny_model().config.to_dict()}))
    with pytest.raises(RunFolderError, match="learning_rate"):
        train(tiny_model(), data, data, quick_config(partial))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a run folder"):
        train(tiny_model(), data, data, quick_config(foreign))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bf16_mixed_precision_and_the_metric_log(tmp_path):
    data = toy_dataset(48, seed=3)
    result = train(tiny_model(), data, data, quick_config(tmp_path / "bf16", mixed_precision="bf16", log_every=1))
    rows = records(tmp_path / "bf16")
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == result.steps == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert rows[-1]["eval_samples"] == 48 and 0 <= rows[-1]["eval_accuracy"] <= 1
    # the cosine schedule reaches zero at the last step
    assert [row for row in rows if "learning_rate" in row][-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)
    # a second training in the same process with other settings works (state is reset)
    train(tiny_model(), data, None, quick_config(tmp_path / "fp32"))


def test_bad_training_settings_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(output_dir="x", batch_size=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig(output_dir="x", mixed_precision="fp8")
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingConfig(output_dir="x", warmup_ratio=1.5)
