"""The `s4bt` command: train -> compress -> retrain -> evaluate on a small sMNIST subset, and
one-line errors for bad input that never overwrite anything."""

import json
import shutil

import pytest

from s4bt_hf.cli import main

TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "8", "--train-samples", "64", "--batch-size", "32",
        "--no-progress"]


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--task", "smnist", "--output", str(folder), *TINY]) == 0
    return folder


def test_help_texts(capsys):
    for command in ([], ["train"], ["compress"], ["evaluate"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: s4bt" in capsys.readouterr().out


def test_train_compress_retrain_evaluate(trained, tmp_path, capsys):
    assert (trained / "final" / "run_summary.json").exists() and (trained / "metrics.jsonl").exists()
    compressed = tmp_path / "r2"
    result = run(capsys, "compress", "--model", str(trained / "final"), "--rank", "2", "--output", str(compressed))
    assert result["d_state"] == 2 and result["ssm_parameters"][1] < result["ssm_parameters"][0]
    assert (compressed / "compression_report.json").exists()
    retrained = tmp_path / "retrained"
    result = run(capsys, "train", "--task", "smnist", "--init-from", str(compressed), "--output", str(retrained),
                 *TINY)
    assert result["steps"] == 2 and 0 <= result["best_validation_accuracy"] <= 1
    saved = json.loads((retrained / "final" / "config.json").read_text())
    assert saved["d_state"] == 2
    metrics_file = tmp_path / "metrics.json"
    result = run(capsys, "evaluate", "--model", str(retrained / "final"), "--task", "smnist", "--split", "test",
                 "--output", str(metrics_file), "--no-progress")
    assert result["samples"] == 500 and 0 <= result["accuracy"] <= 1
    assert json.loads(metrics_file.read_text())["accuracy"] == result["accuracy"]


def test_errors_name_the_problem_and_keep_the_user_files(trained, tmp_path, capsys):
    assert "invalid choice: 'mnist'" in fails(capsys, "train", "--task", "mnist", "--output", str(tmp_path / "x"))
    assert "no model folder" in fails(capsys, "evaluate", "--model", str(tmp_path / "missing"), "--task", "smnist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json is missing" in fails(capsys, "compress", "--model", str(empty), "--rank", "2",
                                             "--output", str(tmp_path / "c"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained / "final", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load the model" in fails(capsys, "evaluate", "--model", str(corrupt), "--task", "smnist")
    assert "token inputs but the model reads real-valued" in fails(
        capsys, "evaluate", "--model", str(trained / "final"), "--task", "listops")
    assert "must be in [1, d_state=8]" in fails(capsys, "compress", "--model", str(trained / "final"), "--rank", "9",
                                                "--output", str(tmp_path / "c9"))
    assert not (tmp_path / "c9").exists()
    assert "already holds a finished run" in fails(capsys, "train", "--task", "smnist", "--output", str(trained),
                                                   *TINY)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert "not empty" in fails(capsys, "compress", "--model", str(trained / "final"), "--rank", "2",
                                "--output", str(occupied))
    assert (occupied / "keep.txt").read_text() == "mine"
    metrics_file = tmp_path / "existing.json"
    metrics_file.write_text("{}")
    assert "already exists" in fails(capsys, "evaluate", "--model", str(trained / "final"), "--task", "smnist",
                                     "--output", str(metrics_file))
    assert metrics_file.read_text() == "{}"


def test_resume_with_another_configuration_is_refused(trained, tmp_path, capsys):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(trained, interrupted)
    shutil.rmtree(interrupted / "final")  # as if the run had been killed before the end
    error = fails(capsys, "train", "--task", "smnist", "--output", str(interrupted), *TINY, "--lr", "0.5")
    assert "another configuration" in error and "learning_rate" in error
