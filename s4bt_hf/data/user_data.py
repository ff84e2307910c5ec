"""A user's own dataset as a task: files (CSV, JSON lines, Parquet) or a dataset folder, read with
`datasets`, checked row by row, and turned into the splits and the `TaskInfo` the built-in tasks
have, so that every entry point runs it on the same code path.

    >>> info = load_user_task(UserData(train_file="train.parquet", input_columns=("signal",)))
    >>> splits = info.builder()  # DatasetDict: train, validation (a seeded split if none given), test

Inputs are sequences: `input_columns` names one list-valued column per channel, or one column of
(L, C) sequences (CSV cells hold them as text: "[1, 2, 3]" or "1 2 3"); or `text_column` with a
tokenizer `AutoTokenizer` loads. Real-valued inputs are normalised per channel by an
`S4DSSFeatureExtractor` fitted on the training split (`info.preprocessor`, saved with the model).
The problem type follows from the training labels as transformers' example scripts decide it:
strings or ints are single-label classes, floats a regression target, lists multi-label targets
(names, or 0/1 indicators) — or `problem_type` says so. Bad data raises `DataError`, one line
naming the file, the column and the row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np

from ..feature_extraction_s4dss import S4DSSFeatureExtractor
from .task_info import TaskInfo

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
SPLITS = ("train", "validation", "test")
DEFAULT_LABEL_COLUMNS = ("label", "labels")
# `s4bt reproduce` on user data: the CPU budget of the built-in sMNIST task (a small model, three
# originals of different training lengths), with the user's data as they are
USER_DATA_BUDGETS = {
    "cpu": dict(d_model=32, n_layers=2, d_state=64, ranks=[2, 4, 8, 16], equal_total_ranks=[16],
                originals=[(0, 3), (1, 2), (2, 1)], main_epochs=1, batch_size=50),
}
_NUMBER_SEPARATORS = re.compile(r"[,;\s]+")


class DataError(ValueError):
    """A user's data cannot be used as given; the message names the file, column and row."""


@dataclass(frozen=True)
class UserData:
    """Where a user's dataset is and how to read it (the data options of the entry points)."""

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset: str | None = None  # a `save_to_disk` folder, or a folder of data files `load_dataset` reads
    input_columns: tuple[str, ...] = ()
    text_column: str | None = None
    tokenizer: str | None = None
    label_column: str | None = None  # default: "label", then "labels"
    problem_type: str | None = None  # default: from the training labels
    validation_split_percentage: int = 10  # without a validation split: this share of the training data
    seed: int = 0
    max_length: int | None = None  # tokens kept per text (truncation); None: all
    name: str | None = None  # how model cards name the data (default: the folder or training file's name)

    def __post_init__(self):
        object.__setattr__(self, "input_columns", tuple(self.input_columns))
        if (self.dataset is None) == (self.train_file is None):
            raise DataError("give either a training file (--train-file) or a dataset folder (--dataset), not both "
                            "and not neither")
        if self.dataset is not None and (self.validation_file or self.test_file):
            raise DataError("--validation-file/--test-file go with --train-file, not with --dataset")
        if self.text_column is not None and self.input_columns:
            raise DataError("give either --input-columns (sequences of numbers) or --text-column (text), not both")
        if (self.text_column is None) != (self.tokenizer is None):
            raise DataError("--text-column and --tokenizer go together (the tokenizer turns the text into ids)")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise DataError(f"unknown problem type {self.problem_type!r}; choose one of {', '.join(PROBLEM_TYPES)}")
        if not 1 <= self.validation_split_percentage <= 99:
            raise DataError(f"--validation-split-percentage must be in 1..99, got {self.validation_split_percentage}")

    @property
    def display_name(self) -> str:
        source = self.dataset if self.dataset is not None else self.train_file
        return self.name or os.path.basename(os.path.normpath(source))

    def fingerprint(self) -> str:
        """12 hex digits of SHA-256 over the data files' bytes and every reading option: what
        caches (the `s4bt reproduce` stages) key user data by, so that changed data or options
        never reuse a result."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode())
        paths = [path for path in (self.train_file, self.validation_file, self.test_file) if path]
        if self.dataset is not None:
            paths += sorted(os.path.join(root, name) for root, _, names in os.walk(self.dataset) for name in names)
        for path in paths:
            digest.update(path.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:12]

    def sources(self) -> dict[str, str]:
        """Split -> the file (or folder) it comes from, as error messages name it."""
        if self.dataset is not None:
            return {split: f"{self.dataset} ({split} split)" for split in SPLITS}
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path is not None}


def load_user_task(spec: UserData) -> TaskInfo:
    """Read, check and convert the user's data; returns its `TaskInfo` (builder returning the
    splits, model inputs, labels, fitted preprocessor, description)."""
    raw = _read(spec)
    sources = spec.sources()
    train = raw["train"]
    label_column = _label_column(spec, train, sources["train"])
    columns = _input_columns(spec, train, sources["train"])
    for split, data in raw.items():
        _require_columns(data, [*columns, label_column], sources[split])
    labels = LabelEncoding.fit(train[label_column], spec.problem_type, sources["train"], label_column,
                               train.features[label_column])
    if spec.text_column is not None:
        tokenizer = _load_tokenizer(spec.tokenizer)
        converted = {split: {"input_ids": _token_ids(data[spec.text_column], tokenizer, spec, sources[split])}
                     for split, data in raw.items()}
        inputs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        preprocessor = tokenizer
    else:
        sequences = {split: _sequences(data, columns, sources[split]) for split, data in raw.items()}
        channels = _common_channels(sequences, columns, sources)
        preprocessor = S4DSSFeatureExtractor(feature_size=channels).fit(sequences["train"])
        converted = {split: {"input_values": [preprocessor.normalize(values).astype(np.float32) for values in rows]}
                     for split, rows in sequences.items()}
        inputs = {"input_dim": channels}
    for split, data in raw.items():
        converted[split]["labels"] = [labels.encode(value, sources[split], label_column, row)
                                      for row, value in enumerate(data[label_column])]
    splits = datasets.DatasetDict({split: datasets.Dataset.from_dict(columns) for split, columns in converted.items()})
    if "validation" not in splits:
        parts = splits["train"].train_test_split(test_size=spec.validation_split_percentage / 100, seed=spec.seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
    splits = datasets.DatasetDict({split: splits[split] for split in SPLITS if split in splits})
    return TaskInfo(
        name=spec.display_name, input_kind="tokens" if spec.text_column else "values", num_labels=labels.num_labels,
        builder=_fixed(splits), describe=_describe(spec, splits, columns, label_column, labels),
        problem_type=labels.problem_type, id2label=labels.id2label, preprocessor=preprocessor,
        budgets=USER_DATA_BUDGETS, **inputs,
    )


# ---------------------------------------------------------------------------------------------- reading
def _read(spec: UserData) -> dict[str, datasets.Dataset]:
    """The splits as `datasets` reads them, in memory (the cache goes to a throwaway folder),
    quietly: its progress bars and its own error logs would break the one-line report."""
    bars, verbosity = datasets.utils.logging.is_progress_bar_enabled(), datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="s4bt-data-") as cache:
            if spec.dataset is not None:
                raw = _read_dataset_folder(spec.dataset, cache)
            else:
                raw = {split: _read_file(path, cache) for split, path in spec.sources().items()}
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.logging.enable_progress_bar()
    sources = spec.sources()
    if "train" not in raw:
        raise DataError(f"{spec.dataset}: no 'train' split (found: {', '.join(raw) or 'none'})")
    for split, data in raw.items():
        if len(data) == 0:
            raise DataError(f"{sources[split]}: the {split} data hold no rows")
    return raw


def _read_file(path: str, cache: str) -> datasets.Dataset:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type; use .csv, .json/.jsonl (JSON lines) or .parquet")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    if builder == "parquet" and _parquet_rows(path) == 0:  # datasets' reader fails on it with a cryptic error
        raise DataError(f"{path}: the file holds no rows")
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, cache_dir=cache, keep_in_memory=True,
                                     split="train")
    except Exception as error:  # parsers raise many types; the cause is in the file
        cause = error.__cause__ or error
        raise DataError(f"{path}: cannot be read as {builder} ({type(cause).__name__}: "
                        f"{' '.join(str(cause).split())[:300]})") from error


def _parquet_rows(path: str) -> int | None:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception:  # not Parquet at all: the reader names the problem
        return None


def _read_dataset_folder(path: str, cache: str) -> dict[str, datasets.Dataset]:
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such dataset folder")
    try:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
                os.path.join(path, "dataset_info.json")):
            loaded = datasets.load_from_disk(path, keep_in_memory=True)  # written by `save_to_disk`
        else:
            loaded = datasets.load_dataset(path, cache_dir=cache, keep_in_memory=True)
    except Exception as error:
        raise DataError(f"{path}: cannot be read as a dataset ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:300]})") from error
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    names = {"valid": "validation", "dev": "validation"}
    return {names.get(split, split): data for split, data in loaded.items() if names.get(split, split) in SPLITS}


def _require_columns(data: datasets.Dataset, columns, source: str) -> None:
    for column in columns:
        if column not in data.column_names:
            raise DataError(f"{source}: no column {column!r} (columns: {', '.join(data.column_names)})")


def _label_column(spec: UserData, train: datasets.Dataset, source: str) -> str:
    if spec.label_column is not None:
        _require_columns(train, [spec.label_column], source)
        return spec.label_column
    for name in DEFAULT_LABEL_COLUMNS:
        if name in train.column_names:
            return name
    raise DataError(f"{source}: no 'label' or 'labels' column (columns: {', '.join(train.column_names)}); name the "
                    "labels with --label-column")


def _input_columns(spec: UserData, train: datasets.Dataset, source: str) -> list[str]:
    if spec.text_column is not None:
        return [spec.text_column]
    if spec.input_columns:
        return list(spec.input_columns)
    if "input_values" in train.column_names:
        return ["input_values"]
    raise DataError(f"{source}: name the input with --input-columns (sequences of numbers) or --text-column (text); "
                    f"columns: {', '.join(train.column_names)}")


# ---------------------------------------------------------------------------------------------- inputs
def _sequences(data: datasets.Dataset, columns: list[str], source: str) -> list[np.ndarray]:
    """Every row as a float64 (L, C) array: one column of (L,) or (L, C) sequences, or one
    column of (L,) sequences per channel."""
    cells = {column: data[column] for column in columns}
    rows = []
    for row in range(len(data)):
        if len(columns) == 1:
            values = _numbers(cells[columns[0]][row], source, columns[0], row)
            values = values[:, None] if values.ndim == 1 else values
        else:
            channels = [_numbers(cells[column][row], source, column, row) for column in columns]
            for column, channel in zip(columns, channels, strict=True):
                if channel.ndim != 1:
                    raise DataError(f"{source}, column {column!r}, row {row}: with one column per channel every "
                                    f"cell must be one sequence (L,), got shape {channel.shape}")
            lengths = {column: len(channel) for column, channel in zip(columns, channels, strict=True)}
            if len(set(lengths.values())) > 1:
                described = ", ".join(f"{column}: {length}" for column, length in lengths.items())
                raise DataError(f"{source}, row {row}: the channels have different lengths ({described})")
            values = np.stack(channels, axis=1)
        if values.ndim != 2 or values.shape[0] == 0:
            raise DataError(f"{source}, column {columns[0]!r}, row {row}: expected a non-empty sequence (L,) or "
                            f"(L, C), got shape {values.shape}")
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            position, channel = bad[0]
            column = columns[channel] if len(columns) > 1 else columns[0]
            raise DataError(f"{source}, column {column!r}, row {row}: {values[position, channel]} at position "
                            f"{position} (NaN/Inf cannot be trained on)")
        rows.append(values)
    return rows


def _numbers(cell, source: str, column: str, row: int) -> np.ndarray:
    """A cell holding a sequence: a list (nested for (L, C)), or text "[1, 2]" / "1 2" (CSV)."""
    where = f"{source}, column {column!r}, row {row}"
    if cell is None:
        raise DataError(f"{where}: the cell is empty")
    if isinstance(cell, str):
        text = cell.strip()
        try:
            cell = json.loads(text) if text.startswith("[") else [float(part) for part in
                                                                  _NUMBER_SEPARATORS.split(text) if part]
        except ValueError:
            raise DataError(f"{where}: {_clip(cell)!r} is not a sequence of numbers") from None
    if isinstance(cell, (int, float)) or not hasattr(cell, "__len__"):
        raise DataError(f"{where}: holds the single value {cell!r}, not a sequence")
    try:
        return np.asarray(cell, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: holds a non-numeric value or sequences of different lengths "
                        f"({_clip(str(cell))})") from None


def _common_channels(sequences: dict, columns: list[str], sources: dict) -> int:
    channels = sequences["train"][0].shape[1]
    for split, rows in sequences.items():
        for row, values in enumerate(rows):
            if values.shape[1] != channels:
                raise DataError(f"{sources[split]}, column {columns[0]!r}, row {row}: {values.shape[1]} channels, "
                                f"but the first training row has {channels}")
    return channels


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise DataError(f"{path}: cannot load a tokenizer ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:300]})") from error
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: the tokenizer has no padding token (set pad_token), so batches cannot be padded")
    return tokenizer


def _token_ids(texts, tokenizer, spec: UserData, source: str) -> list[list[int]]:
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{source}, column {spec.text_column!r}, row {row}: expected text, got {_clip(str(text))}")
    encoded = tokenizer(list(texts), truncation=spec.max_length is not None, max_length=spec.max_length,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    for row, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"{source}, column {spec.text_column!r}, row {row}: the text gives no tokens")
    return encoded


# ---------------------------------------------------------------------------------------------- labels
@dataclass
class LabelEncoding:
    """How the labels of the training data map to the model's `labels`: class ids
    (single-label), multi-hot float vectors (multi-label) or floats (regression)."""

    problem_type: str
    num_labels: int
    names: list | None = None  # class names (classification), in id order
    index: dict = field(default_factory=dict)  # name -> id
    indicators: bool = False  # multi-label given as 0/1 vectors rather than lists of names

    @property
    def id2label(self) -> dict | None:
        return None if self.names is None else {index: str(name) for index, name in enumerate(self.names)}

    @classmethod
    def fit(cls, values: list, problem_type: str | None, source: str, column: str,
            feature=None) -> LabelEncoding:
        """From the training labels (and the column's `datasets` feature: a `ClassLabel` keeps its
        names and ids)."""
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise DataError(f"{source}, column {column!r}, row {row}: the label is missing")
        kind = problem_type or _problem_type_of(values, source, column)
        if isinstance(feature, datasets.ClassLabel) and kind == "single_label_classification":
            return cls(kind, feature.num_classes, list(feature.names), {index: index for index in
                                                                        range(feature.num_classes)})
        if kind == "single_label_classification":
            if any(isinstance(value, (list, tuple)) for value in values):
                raise DataError(f"{source}, column {column!r}: lists of labels are multi-label targets, not "
                                "single-label classes")
            names = sorted(set(values), key=_sort_key)
            return cls(kind, len(names), names, {name: index for index, name in enumerate(names)})
        if kind == "multi_label_classification":
            if not all(isinstance(value, (list, tuple)) for value in values):
                raise DataError(f"{source}, column {column!r}: multi-label targets must be lists (of names, or of "
                                "0/1 per label)")
            if all(all(_is_number(item) for item in value) for value in values):
                width = _fixed_width(values, source, column)
                for row, value in enumerate(values):
                    if any(item not in (0, 1) for item in value):
                        raise DataError(f"{source}, column {column!r}, row {row}: multi-label indicators must be 0 "
                                        f"or 1, got {_clip(str(value))}")
                return cls(kind, width, [str(index) for index in range(width)], indicators=True)
            names = sorted({item for value in values for item in value}, key=_sort_key)
            return cls(kind, len(names), names, {name: index for index, name in enumerate(names)})
        # regression: one float, or a fixed-length vector of floats
        for row, value in enumerate(values):
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(_is_number(item) and math.isfinite(item) for item in items):
                raise DataError(f"{source}, column {column!r}, row {row}: a regression target must be finite "
                                f"numbers, got {_clip(str(value))}")
        width = _fixed_width(values, source, column) if isinstance(values[0], (list, tuple)) else 1
        return cls(kind, width)

    def encode(self, value, source: str, column: str, row: int):
        where = f"{source}, column {column!r}, row {row}"
        if value is None:
            raise DataError(f"{where}: the label is missing")
        if self.problem_type == "regression":
            items = value if isinstance(value, (list, tuple)) else [value]
            if len(items) != self.num_labels or not all(_is_number(item) and math.isfinite(item) for item in items):
                raise DataError(f"{where}: expected {self.num_labels} finite number(s), got {_clip(str(value))}")
            return float(items[0]) if self.num_labels == 1 else [float(item) for item in items]
        if self.problem_type == "multi_label_classification":
            if not isinstance(value, (list, tuple)):
                raise DataError(f"{where}: multi-label targets must be lists, got {_clip(str(value))}")
            if self.indicators:
                if len(value) != self.num_labels or any(item not in (0, 1) for item in value):
                    raise DataError(f"{where}: expected {self.num_labels} indicators 0/1, got {_clip(str(value))}")
                return [float(item) for item in value]
            hot = [0.0] * self.num_labels
            for item in value:
                hot[self._id(item, where)] = 1.0
            return hot
        return self._id(value, where)

    def _id(self, name, where: str) -> int:
        if name not in self.index:
            known = ", ".join(str(known) for known in self.names[:10]) + (", ..." if len(self.names) > 10 else "")
            raise DataError(f"{where}: label {name!r} never occurs in the training data (training labels: {known})")
        return self.index[name]


def _problem_type_of(values: list, source: str, column: str) -> str:
    """As transformers' example scripts decide: lists -> multi-label, floats -> regression,
    strings, ints and bools -> single-label classes."""
    if all(isinstance(value, (list, tuple)) for value in values):
        return "multi_label_classification"
    if all(isinstance(value, str) for value in values) or all(
            isinstance(value, (int, np.integer)) for value in values):
        return "single_label_classification"
    if all(_is_number(value) for value in values):
        return "regression"
    kinds = sorted({type(value).__name__ for value in values})
    raise DataError(f"{source}, column {column!r}: labels of mixed kinds ({', '.join(kinds)}); give --problem-type "
                    "or clean the column")


def _fixed_width(values: list, source: str, column: str) -> int:
    width = len(values[0])
    for row, value in enumerate(values):
        if len(value) != width or width == 0:
            raise DataError(f"{source}, column {column!r}, row {row}: {len(value)} values, but the first row has "
                            f"{width}")
    return width


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _sort_key(value):
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------- the task
def _fixed(splits: datasets.DatasetDict) -> Callable[..., datasets.DatasetDict]:
    """A builder returning the converted splits (the built-in tasks' builders take options;
    user data were read once)."""

    def builder(**_options) -> datasets.DatasetDict:
        return splits

    return builder


def _describe(spec: UserData, splits, columns, label_column: str, labels: LabelEncoding) -> Callable[[dict], str]:
    files = [path for path in (spec.dataset, spec.train_file, spec.validation_file, spec.test_file) if path]
    sizes = ", ".join(f"{len(data)} {split}" for split, data in splits.items())
    inputs = (f"text column `{spec.text_column}` tokenized by `{spec.tokenizer}`" if spec.text_column
              else f"sequences from column(s) {', '.join(f'`{column}`' for column in columns)}, normalised per channel "
              "with statistics of the training split (preprocessor_config.json)")
    split_note = ("" if spec.dataset is not None or spec.validation_file
                  else f"; validation: a seeded {spec.validation_split_percentage} % of the training file "
                  f"(seed {spec.seed})")
    text = (f"User data `{spec.display_name}` ({', '.join(os.path.basename(path) for path in files)}): {sizes} "
            f"examples{split_note}; inputs: {inputs}; labels: column `{label_column}`, "
            f"{labels.problem_type.replace('_', ' ')}, {labels.num_labels} output(s).")
    return lambda _options=None: text
