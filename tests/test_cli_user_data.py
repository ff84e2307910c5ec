"""The `s4bt` subcommands on a user's own files: train (ragged series, text, regression), evaluate,
compress with a refit on the user's data, compare-reductions and reproduce; bad data are one line
with exit status 2 and nothing written."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import ModelCard
from test_feature_extraction import bert_style_tokenizer
from test_user_data import series_frame, write
from transformers import AutoFeatureExtractor, pipeline

from s4bt_hf.cli import main

TINY_MODEL = ["--d-model", "8", "--n-layers", "1", "--d-state", "4", "--batch-size", "8", "--no-progress"]


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def series_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-series")
    return (write(series_frame(rows=40, seed=0)[0], folder / "train.parquet"),
            write(series_frame(rows=12, seed=1)[0], folder / "test.parquet"))


def test_train_evaluate_compress_export_on_a_parquet_file(tmp_path, capsys, series_files):
    train, test = series_files
    data = ["--train-file", train, "--test-file", test, "--input-columns", "c0"]
    code, out, err = run(capsys, "train", *data, "--output", str(tmp_path / "run"), "--epochs", "2", *TINY_MODEL)
    assert code == 0, err
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "down", "1": "up"} and config["input_dim"] == 1
    assert (tmp_path / "run" / "best" / "preprocessor_config.json").is_file()
    assert "User data `train.parquet`" in (final / "README.md").read_text()
    card = ModelCard.load(final / "README.md").data
    summary = json.loads(out.strip().splitlines()[-1])
    (result,) = card.eval_results
    assert (result.metric_type, result.dataset_split) == ("accuracy", "validation")
    assert result.metric_value == pytest.approx(summary["final_validation"]["accuracy"])
    assert card.datasets == ["train.parquet"] and card.base_model is None
    extractor = AutoFeatureExtractor.from_pretrained(final)
    scores = pipeline("audio-classification", model=str(final), feature_extractor=extractor)(np.ones(9, np.float32))
    assert {entry["label"] for entry in scores} == {"down", "up"}

    code, out, err = run(capsys, "evaluate", "--model", str(final), *data, "--split", "test", "--no-progress")
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["samples"] == 12 and 0 <= metrics["accuracy"] <= 1

    code, out, err = run(capsys, "compress", "--model", str(final), "--rank", "2", *data, "--refit-samples", "16",
                         "--output", str(tmp_path / "small"))
    assert code == 0, err
    report = json.loads((tmp_path / "small" / "compression_report.json").read_text())
    assert report["layers"][0]["refit"] is not None
    code, out, err = run(capsys, "export", "--model", str(tmp_path / "small"), "--output", str(tmp_path / "onnx"))
    assert code == 0, err
    # the exported folder records the normalisation (the graph does not apply it)
    saved = ["feature_extraction_s4dss.py", "preprocessor_config.json"]  # its remote code too
    assert json.loads(out.strip().splitlines()[-1])["preprocessor"] == saved
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["preprocessor"] == saved
    assert AutoFeatureExtractor.from_pretrained(tmp_path / "onnx").mean == extractor.mean
    assert "## Preprocessing" in (tmp_path / "onnx" / "README.md").read_text()
    from s4bt_hf.export import load_exported

    load_exported(tmp_path / "onnx")  # the extra files do not disturb the folder's checks
    code, out, err = run(capsys, "train", *data, "--init-from", str(tmp_path / "small"), "--output",
                         str(tmp_path / "retrained"), "--max-steps", "2", *TINY_MODEL)
    assert code == 0, err
    card = ModelCard.load(tmp_path / "retrained" / "final" / "README.md").data
    assert card.base_model == str(tmp_path / "small")
    assert card.eval_results[0].metric_value == pytest.approx(
        json.loads(out.strip().splitlines()[-1])["final_validation"]["accuracy"])


def test_text_and_regression_files(tmp_path, capsys):
    bert_style_tokenizer().save_pretrained(tmp_path / "tokenizer")
    texts = pd.DataFrame({"sentence": ["very good movie", "bad plot", "good plot", "very bad movie"] * 6,
                          "label": ["pos", "neg", "pos", "neg"] * 6})
    code, _, err = run(capsys, "train", "--train-file", write(texts, tmp_path / "t.csv"), "--text-column", "sentence",
                       "--tokenizer", str(tmp_path / "tokenizer"), "--output", str(tmp_path / "text"), *TINY_MODEL)
    assert code == 0, err
    assert (tmp_path / "text" / "final" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "text" / "final" / "config.json").read_text())["vocab_size"] == 7

    regression = write(series_frame(rows=30, labels="floats")[0], tmp_path / "r.jsonl")
    code, _, err = run(capsys, "train", "--train-file", regression, "--input-columns", "c0",
                       "--output", str(tmp_path / "reg"), *TINY_MODEL)
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", "--model", str(tmp_path / "reg" / "final"), "--train-file", regression,
                         "--input-columns", "c0", "--split", "validation", "--no-progress")
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"mse", "mae"} <= set(metrics) and "accuracy" not in metrics


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"c0": [[1.0, 2.0], [1.0, np.inf]], "label": ["a", "b"]}),
     r"bad\.parquet, column 'c0', row 1: inf at position 1"),
    (pd.DataFrame({"x": [[1.0, 2.0]], "label": ["a"]}), r"bad\.parquet: no column 'c0' \(columns: x, label\)"),
])
def test_bad_data_is_one_line_and_nothing_is_written(tmp_path, capsys, frame, message):
    path = write(frame, tmp_path / "bad.parquet")
    for argv in (["train", "--output", str(tmp_path / "run"), *TINY_MODEL],
                 ["evaluate", "--model", str(tmp_path / "missing")]):
        code, out, err = run(capsys, *argv, "--train-file", path, "--input-columns", "c0")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["bad.parquet"]
    code, _, err = run(capsys, "train", "--task", "smnist", "--train-file", path, "--output", str(tmp_path / "r"))
    assert code == 2 and "not both" in err


def test_compare_reductions_and_reproduce_on_user_data(tmp_path, capsys, series_files):
    train, test = series_files
    data = ["--train-file", train, "--test-file", test, "--input-columns", "c0"]
    code, _, err = run(capsys, "train", *data, "--output", str(tmp_path / "run"), *TINY_MODEL)
    assert code == 0, err
    code, out, err = run(capsys, "compare-reductions", "--model", str(tmp_path / "run" / "final"), *data,
                         "--ranks", "2", "--calibration-samples", "16", "--output", str(tmp_path / "compare"))
    assert code == 0, err
    assert (tmp_path / "compare" / "results.json").is_file()
    code, out, err = run(capsys, "reproduce", *data, "--ranks", "2", "--equal-total-ranks", "--output",
                         str(tmp_path / "reproduce"), "--no-progress")
    assert code == 0, err
    results = json.loads((tmp_path / "reproduce" / "results.json").read_text())
    assert results["task"].startswith("user:train.parquet@") and results["per_rank"][0]["rank"] == 2
    code, _, err = run(capsys, "reproduce", "--train-file", train, "--input-columns", "c0", "--output",
                       str(tmp_path / "no-test"))
    assert code == 2 and "give a test split" in err
