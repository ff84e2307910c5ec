"""examples/run_classification.py: a user's Parquet/CSV/text data, a new or a saved (reduced) model,
the metrics of each problem type, the saved preprocessor, a pipeline on the output folder, and the
same command under `accelerate launch` and `torchrun` with two CPU processes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_feature_extraction import bert_style_tokenizer
from test_user_data import series_frame, write
from transformers import AutoFeatureExtractor, pipeline

import s4bt_hf

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "run_classification.py"
TINY = ["--d_model", "8", "--n_layers", "1", "--d_state", "4", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "0.01", "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]


def example():
    spec = importlib.util.spec_from_file_location("run_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def series_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    train, _ = series_frame(rows=40, seed=0)
    test, _ = series_frame(rows=12, seed=1)
    return write(train, folder / "train.parquet"), write(test, folder / "test.parquet")


def test_parquet_series_new_model_to_pipeline(tmp_path, series_files):
    train, test = series_files
    output = tmp_path / "out"
    results = example().main(["--train_file", train, "--test_file", test, "--input_columns", "c0",
                              "--output_dir", str(output), "--do_train", "--do_eval", "--do_predict",
                              "--num_train_epochs", "2", *TINY])
    assert {"eval_accuracy", "test_accuracy", "train_loss"} <= set(results)
    assert json.loads((output / "all_results.json").read_text()) == pytest.approx({**results, "num_processes": 1})
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "down", "1": "up"} and config["problem_type"] == "single_label_classification"
    card = (output / "README.md").read_text()
    assert "## Training procedure" in card and "User data `train.parquet`" in card and "datasets:" in card
    extractor = AutoFeatureExtractor.from_pretrained(output)
    assert isinstance(extractor, s4bt_hf.S4DSSFeatureExtractor) and extractor.mean is not None
    scores = pipeline("audio-classification", model=str(output))(np.linspace(-3, 3, 11).astype(np.float32))
    assert {entry["label"] for entry in scores} == {"down", "up"}


def test_regression_csv_and_a_reduced_saved_model(tmp_path):
    frame, _ = series_frame(rows=30, labels="floats")
    train = write(frame, tmp_path / "train.csv")
    first = example().main(["--train_file", train, "--input_columns", "c0", "--output_dir", str(tmp_path / "a"),
                            "--do_train", "--do_eval", "--max_steps", "2", *TINY])
    assert {"eval_mse", "eval_mae"} <= set(first) and "eval_accuracy" not in first
    second = example().main(["--train_file", train, "--input_columns", "c0", "--model_name_or_path",
                             str(tmp_path / "a"), "--reduce_method", "balanced_truncation", "--reduce_rank", "2",
                             "--output_dir", str(tmp_path / "b"), "--do_train", "--do_eval", "--max_steps", "2", *TINY])
    assert np.isfinite(second["eval_mse"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["d_state"] == 2


def test_text_with_a_tokenizer_and_bad_data(tmp_path):
    bert_style_tokenizer().save_pretrained(tmp_path / "tokenizer")
    frame = series_frame(rows=1)[0].iloc[:0]  # no rows
    texts = pd.DataFrame({"sentence": ["very good movie", "bad plot", "good plot", "very bad movie"] * 6,
                          "label": ["pos", "neg", "pos", "neg"] * 6})
    results = example().main(["--train_file", write(texts, tmp_path / "t.jsonl"), "--text_column", "sentence",
                              "--tokenizer_name", str(tmp_path / "tokenizer"), "--output_dir", str(tmp_path / "text"),
                              "--do_train", "--do_eval", "--max_steps", "2", *TINY])
    assert "eval_accuracy" in results
    assert (tmp_path / "text" / "tokenizer.json").is_file()
    frame.to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(SystemExit, match=r"empty\.parquet: the file holds no rows"):
        example().main(["--train_file", str(tmp_path / "empty.parquet"), "--input_columns", "c0",
                        "--output_dir", str(tmp_path / "never"), "--do_train", *TINY])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_cpu_processes(tmp_path, series_files, launcher):
    train, test = series_files
    if launcher == "accelerate":
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        command = [torchrun, "--nproc_per_node", "2", "--standalone", str(SCRIPT)]
    output = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--train_file", train, "--test_file", test, "--input_columns", "c0",
                             "--output_dir", str(output), "--do_train", "--do_eval", "--max_steps", "3", *TINY],
                            capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((output / "all_results.json").read_text())
    assert "eval_accuracy" in results and results["train_loss"] > 0
    assert (output / "preprocessor_config.json").is_file() and (output / "model.safetensors").is_file()
    assert results["num_processes"] == 2
