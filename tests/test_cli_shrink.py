"""`s4bt shrink` on a built-in task and on a user's file: the chosen model, its report and test
metrics, retraining, resuming, and one-line errors that write nothing."""

import json

import pytest
from test_cli_user_data import run
from test_user_data import series_frame, write

from s4bt_hf import S4DSSForSequenceClassification
from s4bt_hf.cli import main
from s4bt_hf.shrink_search import ShrinkReport

TINY = ["--d-model", "8", "--n-layers", "2", "--d-state", "4", "--train-samples", "64", "--batch-size", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shrink") / "run"
    assert main(["train", "--task", "smnist", "--output", str(folder), "--epochs", "1", *TINY]) == 0
    return folder / "best"


def test_shrink_writes_the_chosen_model_its_report_and_test_metrics(tmp_path, capsys, trained):
    output = tmp_path / "shrunk"
    code, out, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--train-samples", "64",
                         "--max-drop", "2", "--methods", "balanced_truncation", "last", "--refit", "both",
                         "--refit-samples", "16", "--output", str(output), "--no-progress")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    saved = json.loads((output / "shrink_report.json").read_text())
    report = ShrinkReport.from_dict(saved["search"])
    model = S4DSSForSequenceClassification.from_pretrained(output / "shrunk")
    if report.best is None:
        assert model.config.d_state == 4
    else:
        assert summary["chosen"]["states"] == report.best.states == 8 * sum(model.config.layer_d_states)
        assert report.best.value >= report.original_value - 0.02
    assert summary["evaluations"] == len(report.candidates) >= 1
    assert {c.method for c in report.candidates} <= {"balanced_truncation", "last"}
    assert saved["test"]["original"]["samples"] == 500 and 0 <= summary["test"]["shrunk"]["accuracy"] <= 1
    assert "Test split (not used by the search)" in (output / "shrink_report.md").read_text()

    # the same command again reuses the search; with other settings the folder is refused
    code, out, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--train-samples", "64",
                         "--max-drop", "2", "--methods", "balanced_truncation", "last", "--refit", "both",
                         "--refit-samples", "16", "--output", str(output), "--no-progress", "--retrain-epochs", "1",
                         "--train-batch-size", "32")
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["evaluations"] == summary["evaluations"] and "shrink:" not in err
    assert (output / "retrained" / "final" / "config.json").is_file()
    assert again["retrained"]["steps"] == 2  # 64 examples, batch 32, one epoch
    code, _, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--max-drop", "1",
                       "--output", str(output), "--no-progress")
    assert code == 2 and "other settings (max_drop" in err
    # cut off after saving the model but before the report: the search is done again
    (output / "shrink_report.json").unlink()
    code, out, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--train-samples", "64",
                         "--max-drop", "2", "--methods", "last", "--refit", "no", "--output", str(output),
                         "--no-progress")
    assert code == 2 and "other settings (methods, refit, refit_samples)" in err  # settings still guard it
    code, out, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--train-samples", "64",
                         "--max-drop", "2", "--methods", "balanced_truncation", "last", "--refit", "both",
                         "--refit-samples", "16", "--output", str(output), "--no-progress")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["evaluations"] == summary["evaluations"]
    assert (output / "shrink_report.json").is_file() and (output / "shrunk" / "config.json").is_file()


def test_shrink_on_a_user_file(tmp_path, capsys):
    train = write(series_frame(rows=40, seed=0)[0], tmp_path / "train.parquet")
    data = ["--train-file", train, "--input-columns", "c0"]
    code, _, err = run(capsys, "train", *data, "--output", str(tmp_path / "run"), "--epochs", "1",
                       "--d-model", "4", "--n-layers", "1", "--d-state", "4", "--batch-size", "8", "--no-progress")
    assert code == 0, err
    code, out, err = run(capsys, "shrink", "--model", str(tmp_path / "run" / "best"), *data, "--max-drop", "50",
                         "--methods", "last", "--refit", "no", "--output", str(tmp_path / "small"), "--no-progress")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["test"] == {}  # no test split
    assert (tmp_path / "small" / "shrunk" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--max-drop", "100"], "leaves nothing to keep"),
    (["--methods", "bt"], "invalid choice"),
    (["--refit", "maybe"], "invalid choice"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, trained, extra, message):
    code, _, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--output",
                       str(tmp_path / "out"), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_task_writes_nothing(tmp_path, capsys, trained):
    code, _, err = run(capsys, "shrink", "--model", str(trained), "--task", "listops", "--output",
                       str(tmp_path / "out"))
    assert code == 2 and "token inputs" in err and not (tmp_path / "out").exists()


def test_a_foreign_folder_is_refused(tmp_path, capsys, trained):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "shrink", "--model", str(trained), "--task", "smnist", "--train-samples", "64",
                       "--output", str(tmp_path / "out"))
    assert code == 2 and "not a shrink folder" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
