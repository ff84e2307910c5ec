"""Every subcommand with bad values: exit status 2, one line on stderr, no traceback, and
nothing written (issue 12). Each command runs in its own process, as a user runs it."""

import os
import subprocess
import sys

import pytest

TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "4", "--no-progress"]
LISTOPS = ["--listops-min-length", "5", "--listops-max-length", "30", "--listops-train", "8", "--listops-eval", "4"]


def bad_commands(tmp):
    run = str(tmp / "run")
    model = str(tmp / "missing-model")  # never reached: the bad value is refused first
    train = ["train", "--task", "smnist", "--output", run, *TINY]
    evaluate = ["evaluate", "--model", model, "--task", "smnist"]
    return {
        "epochs 0": [*train, "--epochs", "0"],
        "epochs -1": [*train, "--epochs", "-1"],
        "d-model 0": ["train", "--task", "smnist", "--output", run, "--d-model", "0"],
        "batch-size 0 (train)": [*train, "--batch-size", "0"],
        "batch-size 0 (evaluate)": [*evaluate, "--batch-size", "0"],
        "max-steps 0": [*train, "--max-steps", "0"],
        "lr nan": [*train, "--lr", "nan"],
        "dropout 1.5": [*train, "--dropout", "1.5"],
        "listops min above max": ["train", "--task", "listops", "--output", run, *TINY,
                                  "--listops-min-length", "300", "--listops-max-length", "100"],
        "listops-train 0": ["train", "--task", "listops", "--output", run, *TINY, "--listops-train", "0"],
        "listops-eval 0 (evaluate)": ["evaluate", "--model", model, "--task", "listops", "--listops-eval", "0"],
        "output is a file": ["train", "--task", "smnist", "--output", str(tmp / "a-file"), *TINY],
        "grad-accum 0": [*train, "--grad-accum", "0"],
        "warmup-ratio 1.0": [*train, "--warmup-ratio", "1.0"],
        "seed -1": [*train, "--seed", "-1"],
        "weight-decay -1": [*train, "--weight-decay", "-1"],
        "compress rank 0": ["compress", "--model", model, "--output", str(tmp / "c"), "--rank", "0"],
        "compress tol 1.5": ["compress", "--model", model, "--output", str(tmp / "c"), "--tol", "1.5"],
        "compress output is a file": ["compress", "--model", model, "--output", str(tmp / "a-file"), "--rank", "2"],
        "compress --option match_dc=1": ["compress", "--model", model, "--output", str(tmp / "c"), "--rank", "2",
                                         "--method", "modal_truncation", "--option", "match_dc=1"],
        "compress --option max_iterations=2.5": ["compress", "--model", model, "--output", str(tmp / "c"), "--rank",
                                                 "2", "--method", "h2", "--option", "max_iterations=2.5"],
        "train --reduce-option match_dc=no": [*train, "--reduce-at", "0.5", "--reduce-rank", "2", "--reduce-method",
                                              "modal_truncation", "--reduce-option", "match_dc=no"],
        "d-model 1 with layer norm": ["train", "--task", "smnist", "--output", run, "--d-model", "1"],
        "reproduce ranks 0": ["reproduce", "--output", str(tmp / "r"), "--ranks", "0"],
        "reproduce unknown budget": ["reproduce", "--output", str(tmp / "r"), "--budget", "huge"],
        "compare --regularised without --reproduce": ["compare-reductions", "--model", model, "--task", "smnist",
                                                      "--regularised", "--output", str(tmp / "c")],
        "compare --regularised, no compression-aware arm": ["compare-reductions", "--reproduce", str(tmp),
                                                            "--regularised", "--output", str(tmp / "c")],
        "evaluate missing model": evaluate,
        "unknown command": ["fly"],
    }


def test_every_subcommand_refuses_bad_values_in_one_line(tmp_path, capsys):
    """In-process (an exception other than SystemExit would fail the test: no traceback)."""
    from s4bt_hf.cli import main

    (tmp_path / "a-file").write_text("mine")
    failures = []
    for name, argv in bad_commands(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        error = capsys.readouterr().err
        lines = [line for line in error.splitlines() if line.strip()]
        if exit_info.value.code != 2 or len(lines) != 1 or "error:" not in lines[0]:
            failures.append(f"{name}: exit {exit_info.value.code}, stderr {error[-500:]!r}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "a-file").read_text() == "mine"
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_bad_value_in_a_real_process_prints_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "import sys; from s4bt_hf.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "train", "--task", "smnist", "--output", str(tmp_path / "r"),
                             "--epochs", "0"], capture_output=True, text=True, env=env, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "s4bt train: error: argument --epochs: must be a positive integer, got 0 (see s4bt train --help)"]


@pytest.mark.parametrize("bad", ["nan-weights", "missing-tensor"])
def test_evaluate_refuses_a_broken_checkpoint(tmp_path, bad, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    import s4bt_hf
    from s4bt_hf.cli import main

    model = s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(input_dim=1, d_model=8, n_layers=1, d_state=4, num_labels=10))
    model.save_pretrained(tmp_path / "model")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    if bad == "nan-weights":
        weights["classifier.weight"][0, 0] = float("nan")
    else:
        del weights["s4dss.layers.0.kernel.log_A_real"]
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(tmp_path / "model"), "--task", "smnist", "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert ("NaN/Inf weights" in error) if bad == "nan-weights" else ("lacks 1 weight tensor" in error)
    assert len(error.strip().splitlines()) == 1
    del torch


def test_a_run_folder_left_by_a_failed_start_is_reused(tmp_path, capsys):
    from s4bt_hf.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text('{"training": {"learning_rate": 0.5}, "model": {}}')  # no checkpoint
    argv = ["train", "--task", "smnist", "--output", str(run), *TINY, "--train-samples", "16", "--batch-size", "16"]
    assert main(argv) == 0
    assert (run / "final" / "run_summary.json").exists()
