"""A user's own data as a task (`s4bt_hf.data.user_data`): CSV, JSON lines, Parquet and saved
datasets, ragged and multichannel series, text with a tokenizer, single-label, multi-label and
regression targets, the seeded validation split, and one named error for every kind of bad data."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from test_feature_extraction import bert_style_tokenizer

from s4bt_hf.data.collate import PadCollator
from s4bt_hf.data.user_data import DataError, UserData, load_user_task


def series_frame(rows=30, seed=0, channels=1, ragged=True, labels="strings"):
    """Rows of random series whose class is the sign of their mean."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 15, rows) if ragged else np.full(rows, 10)
    frame = {}
    series = [rng.normal(rng.choice([-2.0, 2.0]), 1.0, (length, channels)) for length in lengths]
    for channel in range(channels):
        frame[f"c{channel}"] = [values[:, channel].tolist() for values in series]
    names = np.array(["down", "up"])
    signs = np.array([values.mean() > 0 for values in series])
    frame["label"] = {"strings": names[signs.astype(int)].tolist(), "ints": signs.astype(int).tolist(),
                      "floats": [float(values.mean()) for values in series],
                      "multi": [["up", "big"] if sign else ["down"] for sign in signs]}[labels]
    return pd.DataFrame(frame), series


def write(frame, path):
    if path.suffix == ".csv":  # lists as text cells, as a spreadsheet holds them
        frame = frame.copy()
        for column in frame.columns:
            if isinstance(frame[column].iloc[0], list):
                frame[column] = [" ".join(map(str, cell)) if column != "label" else json.dumps(cell)
                                 for cell in frame[column]]
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_files_become_a_task_with_normalised_ragged_series(tmp_path, suffix):
    frame, series = series_frame()
    test_frame, _ = series_frame(rows=8, seed=1)
    spec = UserData(train_file=write(frame, tmp_path / f"train{suffix}"),
                    test_file=write(test_frame, tmp_path / f"test{suffix}"), input_columns=("c0",), seed=3)
    info = load_user_task(spec)
    assert (info.input_kind, info.input_dim, info.num_labels) == ("values", 1, 2)
    assert info.problem_type == "single_label_classification" and info.id2label == {0: "down", 1: "up"}
    assert info.model_labels()["label2id"] == {"down": 0, "up": 1}
    splits = info.builder()
    assert list(splits) == ["train", "validation", "test"]
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (27, 3, 8)
    stacked = np.concatenate(series)
    extractor = info.preprocessor
    np.testing.assert_allclose(extractor.mean, stacked.mean(0), rtol=1e-9)
    np.testing.assert_allclose(extractor.std, stacked.std(0), rtol=1e-9)
    # the validation rows are a seeded split of the training file, normalised with its statistics
    again = load_user_task(spec).builder()
    assert again["validation"]["labels"] == splits["validation"]["labels"]
    every = {tuple(np.round(np.asarray(values)[:, 0], 4)) for values in splits["train"]["input_values"]} | {
        tuple(np.round(np.asarray(values)[:, 0], 4)) for values in splits["validation"]["input_values"]}
    expected = {tuple(np.round((values[:, 0] - extractor.mean[0]) / extractor.std[0], 4)) for values in series}
    assert every == expected
    batch = PadCollator()([splits["train"].with_format("torch")[index] for index in range(4)])
    assert batch["input_values"].dim() == 3 and batch["attention_mask"].shape == batch["input_values"].shape[:2]
    assert batch["attention_mask"].sum(1).tolist() == [len(splits["train"][index]["input_values"]) for index in
                                                       range(4)]


def test_one_column_per_channel_and_one_column_of_lc_sequences(tmp_path):
    frame, series = series_frame(channels=3, ragged=False)
    per_channel = load_user_task(UserData(train_file=write(frame, tmp_path / "a.parquet"),
                                          input_columns=("c0", "c1", "c2")))
    joined = pd.DataFrame({"x": [values.tolist() for values in series], "label": frame["label"]})
    one_column = load_user_task(UserData(train_file=write(joined, tmp_path / "b.jsonl"), input_columns=("x",)))
    assert per_channel.input_dim == one_column.input_dim == 3
    np.testing.assert_allclose(per_channel.preprocessor.mean, one_column.preprocessor.mean)
    first = per_channel.builder()["train"][0]["input_values"]
    assert np.asarray(first).shape == (10, 3)


def test_saved_dataset_folder_with_class_labels(tmp_path):
    frame, _ = series_frame(labels="ints")
    features = datasets.Features({"c0": datasets.List(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=["falling", "rising"])})
    data = datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)
    datasets.DatasetDict({"train": data, "validation": data.select(range(5)), "test": data.select(range(5, 9))}
                         ).save_to_disk(tmp_path / "saved")
    info = load_user_task(UserData(dataset=str(tmp_path / "saved"), input_columns=("c0",)))
    assert info.id2label == {0: "falling", 1: "rising"}
    assert [len(split) for split in info.builder().values()] == [30, 5, 4]
    assert info.builder()["validation"]["labels"] == frame["label"][:5].tolist()


def test_regression_and_multi_label_targets(tmp_path):
    frame, series = series_frame(labels="floats")
    regression = load_user_task(UserData(train_file=write(frame, tmp_path / "r.parquet"), input_columns=("c0",)))
    assert (regression.problem_type, regression.num_labels, regression.id2label) == ("regression", 1, None)
    assert isinstance(regression.builder()["train"][0]["labels"], float)
    frame, _ = series_frame(labels="multi")
    multi = load_user_task(UserData(train_file=write(frame, tmp_path / "m.jsonl"), input_columns=("c0",)))
    assert multi.problem_type == "multi_label_classification" and multi.id2label == {0: "big", 1: "down", 2: "up"}
    rows = multi.builder()["train"]
    for labels in rows["labels"]:
        assert labels in ([1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    frame["label"] = [[1, 0] if "up" in value else [0, 1] for value in frame["label"]]
    indicators = load_user_task(UserData(train_file=write(frame, tmp_path / "i.jsonl"), input_columns=("c0",)))
    assert indicators.num_labels == 2 and indicators.problem_type == "multi_label_classification"
    forced = load_user_task(UserData(train_file=write(series_frame(labels="ints")[0], tmp_path / "f.parquet"),
                                     input_columns=("c0",), problem_type="regression"))
    assert forced.problem_type == "regression" and forced.builder()["train"][0]["labels"] in (0.0, 1.0)


def test_text_with_a_tokenizer(tmp_path):
    tokenizer = bert_style_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    frame = pd.DataFrame({"sentence": ["very good movie", "bad plot", "good plot", "very bad movie"] * 5,
                          "label": ["pos", "neg", "pos", "neg"] * 5})
    info = load_user_task(UserData(train_file=write(frame, tmp_path / "t.csv"), text_column="sentence",
                                   tokenizer=str(tmp_path / "tokenizer")))
    assert (info.input_kind, info.vocab_size, info.pad_token_id) == ("tokens", len(tokenizer), 0)
    row = info.builder()["train"][0]
    assert set(row) == {"input_ids", "labels"} and all(isinstance(token, int) for token in row["input_ids"])


BAD_CASES = {
    "nan": ("train.jsonl", {"c0": [[1.0, 2.0], [1.0, None, 2.0]], "label": ["a", "b"]}, r"train\.jsonl, column 'c0', "
            r"row 1: .*non-numeric|train\.jsonl, column 'c0', row 1: nan at position 1"),
    "inf": ("train.parquet", {"c0": [[1.0, 2.0], [1.0, np.inf]], "label": ["a", "b"]},
            r"train\.parquet, column 'c0', row 1: inf at position 1"),
    "ragged_channels": ("train.parquet", {"c0": [[1.0, 2.0]], "c1": [[1.0, 2.0, 3.0]], "label": ["a"]},
                        r"train\.parquet, row 0: the channels have different lengths \(c0: 2, c1: 3\)"),
    "unknown_column": ("train.parquet", {"x": [[1.0, 2.0]], "label": ["a"]}, r"train\.parquet: no column 'c0' "
                       r"\(columns: x, label\)"),
    "non_numeric": ("train.csv", {"c0": ["1 2 x"], "label": ["a"]}, r"train\.csv, column 'c0', row 0: '1 2 x' is "
                    "not a sequence of numbers"),
    "no_label": ("train.parquet", {"c0": [[1.0, 2.0]], "y": ["a"]}, r"no 'label' or 'labels' column"),
    "scalar_cell": ("train.jsonl", {"c0": [3.0], "label": ["a"]}, r"row 0: holds the single value 3.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_is_named_in_one_line(tmp_path, case):
    name, columns, message = BAD_CASES[case]
    path = write(pd.DataFrame(columns), tmp_path / name)
    inputs = ("c0", "c1") if case == "ragged_channels" else ("c0",)
    with pytest.raises(DataError, match=message) as raised:
        load_user_task(UserData(train_file=path, input_columns=inputs))
    assert "\n" not in str(raised.value)


def test_empty_files_unseen_labels_and_bad_options(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        load_user_task(UserData(train_file=str(tmp_path / "empty.csv"), input_columns=("c0",)))
    (tmp_path / "header.csv").write_text("c0,label\n")
    with pytest.raises(DataError, match=r"header\.csv"):
        load_user_task(UserData(train_file=str(tmp_path / "header.csv"), input_columns=("c0",)))
    frame, _ = series_frame()
    test = pd.DataFrame({"c0": [[1.0, 2.0]] * 3, "label": ["up", "up", "sideways"]})
    with pytest.raises(DataError, match=r"test\.parquet, column 'label', row 2: label 'sideways' never occurs in the "
                       r"training data \(training labels: down, up\)"):
        load_user_task(UserData(train_file=write(frame, tmp_path / "train.parquet"),
                                test_file=write(test, tmp_path / "test.parquet"), input_columns=("c0",)))
    with pytest.raises(DataError, match="not both"):
        UserData(train_file="a.csv", dataset="folder")
    with pytest.raises(DataError, match="go together"):
        UserData(train_file="a.csv", text_column="text")
    with pytest.raises(DataError, match="unknown problem type"):
        UserData(train_file="a.csv", problem_type="ranking")
    with pytest.raises(DataError, match="unknown file type"):
        (tmp_path / "a.txt").write_text("x")
        load_user_task(UserData(train_file=str(tmp_path / "a.txt")))


def test_collator_renames_label_and_keeps_equal_lengths_stacked():
    collate = PadCollator()
    batch = collate([{"input_values": torch.ones(4, 2), "label": 1}, {"input_values": torch.zeros(4, 2), "label": 0}])
    assert batch["labels"].tolist() == [1, 0] and "attention_mask" not in batch
    with pytest.raises(KeyError, match="they have 'pixels'"):
        collate([{"pixels": [1.0]}])
