"""Long Range Arena ListOps, generated locally.

The generator follows the LRA specification (Tay et al. 2020, ``lra_benchmarks/data/listops.py`` of the
google-research/long-range-arena repository):

* operators ``MIN``, ``MAX``, ``MED`` (``int(median)``: for an even count the mean of the two middle values,
  truncated) and ``SM`` (sum mod 10); digits 0..9;
* a node at depth ``d < max_depth`` draws ``r ~ U(0, 1)``; it is a **leaf if r > 0.25** (so an operator with
  probability 0.25, ``OPERATOR_PROBABILITY``), a uniformly drawn digit; otherwise it is an operator with
  ``k ~ U{2..max_args}`` children generated at depth ``d + 1``. At ``d == max_depth`` a node is always a leaf.
  Generation starts at depth 1;
* a tree's length is its number of tokens: a leaf is 1, an operator node is ``2 + sum(children)`` (the
  operator token, e.g. ``[MAX``, plus the closing ``]``);
* a tree is kept only if ``min_length < length < max_length`` (strict; LRA uses 500 and 2000), and exact
  duplicates are dropped;
* the label is the value of the expression (10 classes).

Differences from the public generator, all deliberate:

* determinism: a seeded numpy ``Generator`` and an insertion-ordered "seen" set; the splits are consecutive
  slices of the generation order (train first, then validation, then test). The public script slices a Python
  ``set`` of strings, whose order depends on ``PYTHONHASHSEED``; ours does not;
* a tree whose partial length already reaches ``max_length`` is abandoned as soon as that happens (it would be
  rejected anyway). This does not change the distribution of the accepted trees, only the speed;
* the tokens are integer ids (no padding, no EOS) rather than a string with ``(`` ``)`` wrappers.

Token ids: 0 = padding, digits ``"0".."9"`` -> 1..10, ``"[MIN" "[MAX" "[MED" "[SM"`` -> 11..14, ``"]"`` -> 15.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # `datasets` (and pyarrow) are imported when a dataset is built; the generator needs numpy only
    import datasets

__all__ = [
    "LISTOPS_BUDGETS",
    "LISTOPS_CLOSE_ID",
    "LISTOPS_DIGIT_IDS",
    "LISTOPS_ID_TO_TOKEN",
    "LISTOPS_LABEL_NAMES",
    "LISTOPS_NUM_LABELS",
    "LISTOPS_OPERATOR_IDS",
    "LISTOPS_OPTIONS",
    "LISTOPS_PAD_ID",
    "LISTOPS_PAD_TOKEN",
    "LISTOPS_TOKEN_TO_ID",
    "LISTOPS_VOCAB",
    "LISTOPS_VOCAB_SIZE",
    "LRA_LISTOPS_SPLITS",
    "OPERATOR_PROBABILITY",
    "describe_listops",
    "evaluate_expression",
    "generate_listops_trees",
    "listops",
    "text_to_tokens",
    "tokens_to_text",
]

LISTOPS_PAD_TOKEN = "<pad>"
#: The vocabulary, indexed by token id.
LISTOPS_VOCAB: tuple[str, ...] = (
    LISTOPS_PAD_TOKEN,
    *(str(digit) for digit in range(10)),
    "[MIN",
    "[MAX",
    "[MED",
    "[SM",
    "]",
)
LISTOPS_TOKEN_TO_ID: dict[str, int] = {token: index for index, token in enumerate(LISTOPS_VOCAB)}
LISTOPS_ID_TO_TOKEN: dict[int, str] = dict(enumerate(LISTOPS_VOCAB))
LISTOPS_VOCAB_SIZE = len(LISTOPS_VOCAB)  # 16
LISTOPS_PAD_ID = LISTOPS_TOKEN_TO_ID[LISTOPS_PAD_TOKEN]  # 0
LISTOPS_DIGIT_IDS: tuple[int, ...] = tuple(range(1, 11))  # digit d has id d + 1
LISTOPS_MIN_ID, LISTOPS_MAX_ID, LISTOPS_MED_ID, LISTOPS_SM_ID = 11, 12, 13, 14
LISTOPS_OPERATOR_IDS: tuple[int, ...] = (LISTOPS_MIN_ID, LISTOPS_MAX_ID, LISTOPS_MED_ID, LISTOPS_SM_ID)
LISTOPS_CLOSE_ID = LISTOPS_TOKEN_TO_ID["]"]  # 15
LISTOPS_NUM_LABELS = 10
LISTOPS_LABEL_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(LISTOPS_NUM_LABELS))

#: LRA's split sizes: ``listops(**LRA_LISTOPS_SPLITS)`` builds the benchmark-sized data (slow: see README).
LRA_LISTOPS_SPLITS: dict[str, int] = {"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000}
#: Probability that a node above the maximum depth is an operator (LRA's ``VALUE_P``: leaf iff ``r > 0.25``).
OPERATOR_PROBABILITY = 0.25

_BUFFER_SIZE = 1 << 16


def tokens_to_text(ids: Iterable[int]) -> str:
    """Render token ids as space-separated tokens, e.g. ``"[MAX 2 9 [MIN 4 7 ] 0 ]"``. Padding is skipped."""
    return " ".join(LISTOPS_ID_TO_TOKEN[int(index)] for index in ids if int(index) != LISTOPS_PAD_ID)


def text_to_tokens(text: str) -> list[int]:
    """Inverse of :func:`tokens_to_text`. Also accepts LRA's rendering (``( [MAX 2 ) 9 ] )``, with ``X`` for
    ``]``): parentheses are dropped."""
    tokens = []
    for piece in text.replace("(", " ").replace(")", " ").split():
        piece = "]" if piece == "X" else piece
        if piece not in LISTOPS_TOKEN_TO_ID:
            raise ValueError(f"unknown ListOps token {piece!r}")
        tokens.append(LISTOPS_TOKEN_TO_ID[piece])
    return tokens


def _apply(operator_id: int, args: list[int]) -> int:
    if not args:
        raise ValueError("a ListOps operator needs at least one argument")
    if operator_id == LISTOPS_MIN_ID:
        return min(args)
    if operator_id == LISTOPS_MAX_ID:
        return max(args)
    if operator_id == LISTOPS_MED_ID:
        ordered = sorted(args)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        # int(np.median(...)): mean of the two middle values, truncated (values are non-negative).
        return (ordered[middle - 1] + ordered[middle]) // 2
    if operator_id == LISTOPS_SM_ID:
        return sum(args) % 10
    raise ValueError(f"token id {operator_id} is not a ListOps operator")


def evaluate_expression(tokens: Sequence[int] | Sequence[str] | str) -> int:
    """Value (0..9) of a ListOps expression given as token ids, token strings or text (see ``text_to_tokens``).

    Padding ids are ignored. Raises ``ValueError`` on a malformed expression.
    """
    if isinstance(tokens, str):
        ids: Iterable[int] = text_to_tokens(tokens)
    elif isinstance(tokens, (bytes, bytearray)):
        ids = tokens
    else:
        ids = [LISTOPS_TOKEN_TO_ID[token] if isinstance(token, str) else int(token) for token in tokens]
    stack: list[tuple[int, list[int]]] = []  # open operators with the values of their finished arguments
    args: list[int] | None = None  # arguments of the innermost open operator
    result: int | None = None
    for position, token in enumerate(ids):
        if 1 <= token <= 10:
            value = token - 1
        elif LISTOPS_MIN_ID <= token <= LISTOPS_SM_ID:
            if result is not None:
                raise ValueError(f"tokens after the end of the expression at position {position}")
            args = []
            stack.append((token, args))
            continue
        elif token == LISTOPS_CLOSE_ID:
            if not stack:
                raise ValueError(f"unmatched ']' at position {position}")
            operator_id, finished = stack.pop()
            value = _apply(operator_id, finished)
            args = stack[-1][1] if stack else None
        elif token == LISTOPS_PAD_ID:
            continue
        else:
            raise ValueError(f"unknown token id {token} at position {position}")
        if args is not None:
            args.append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"tokens after the end of the expression at position {position}")
    if stack or result is None:
        raise ValueError("incomplete ListOps expression")
    return result


def require_int(name: str, value, minimum: int | None = None) -> None:
    """`value` must be an int (numpy ints too, not bool or float) and at least `minimum`. (Defined
    here, not imported: this module also runs on its own, as a file, with numpy only.)"""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _validate(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    for name, value in (("min_length", min_length), ("max_length", max_length), ("max_depth", max_depth),
                        ("max_args", max_args)):
        require_int(name, value)
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2, got {max_args}")
    if min_length < 0 or max_length <= min_length + 1:
        raise ValueError(
            f"need 0 <= min_length and min_length + 1 < max_length (lengths are kept iff min_length < length < "
            f"max_length), got min_length={min_length}, max_length={max_length}"
        )
    if max_depth == 1 and not (min_length < 1 < max_length):
        raise ValueError("with max_depth=1 every tree is a single digit (length 1)")


def generate_listops_trees(
    num_trees: int,
    *,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int | np.random.Generator = 0,
    max_attempts: int | None = None,
) -> list[bytes]:
    """Generate ``num_trees`` distinct ListOps trees, in generation order, each as ``bytes`` of token ids.

    ``max_attempts`` bounds the number of sampled trees (accepted or not); the default is
    ``1000 * num_trees + 100_000``. A ``RuntimeError`` is raised if it is reached (e.g. too many distinct trees
    requested for a narrow length window).
    """
    _validate(min_length, max_length, max_depth, max_args)
    require_int("num_trees", num_trees, minimum=0)
    if not isinstance(seed, np.random.Generator):
        require_int("seed", seed, minimum=0)
    if max_attempts is not None:
        require_int("max_attempts", max_attempts, minimum=1)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if max_attempts is None:
        max_attempts = 1000 * num_trees + 100_000

    # Uniform draws come from a buffer refilled in blocks (per-call numpy draws are slow). Every decision uses
    # exactly one uniform, consumed in a fixed order, so the output depends only on the seed.
    buffer: list[float] = []
    position = 0
    operator_probability = OPERATOR_PROBABILITY
    num_choices = max_args - 1  # k in 2..max_args
    operator_ids = LISTOPS_OPERATOR_IDS
    close_id = LISTOPS_CLOSE_ID
    leaf_depth = max_depth - 1  # len(open_ops) at which a node has depth max_depth

    seen: set[bytes] = set()
    accepted: list[bytes] = []
    attempts = 0
    while len(accepted) < num_trees:
        if attempts >= max_attempts:
            raise RuntimeError(
                f"generated {attempts} ListOps trees but only {len(accepted)} of the requested {num_trees} were "
                f"distinct with {min_length} < length < {max_length}; widen the length window or raise max_attempts"
            )
        attempts += 1
        tokens: list[int] = []
        open_ops: list[int] = []  # remaining children of each open operator (its depth = index + 1)
        too_long = False
        while True:
            if position + 3 > len(buffer):
                buffer = rng.random(_BUFFER_SIZE).tolist()
                position = 0
            depth_index = len(open_ops)
            if depth_index < leaf_depth and buffer[position] <= operator_probability:
                tokens.append(operator_ids[int(buffer[position + 1] * 4)])
                open_ops.append(2 + int(buffer[position + 2] * num_choices))
                position += 3
                # The finished tree has at least one token per open operator still to come (its "]").
                if len(tokens) + len(open_ops) >= max_length:
                    too_long = True
                    break
                continue
            if depth_index < leaf_depth:
                position += 1  # the r that made this node a leaf
            tokens.append(1 + int(buffer[position] * 10))
            position += 1
            # Close every operator whose last child this was.
            while open_ops:
                open_ops[-1] -= 1
                if open_ops[-1]:
                    break
                open_ops.pop()
                tokens.append(close_id)
            if not open_ops:
                break
            if len(tokens) + len(open_ops) >= max_length:
                too_long = True
                break
        if too_long or not (min_length < len(tokens) < max_length):
            continue
        tree = bytes(tokens)
        if tree in seen:
            continue
        seen.add(tree)
        accepted.append(tree)
    return accepted


def _features() -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int8")),
            "labels": datasets.ClassLabel(names=list(LISTOPS_LABEL_NAMES)),
        }
    )


def _to_dataset(trees: Sequence[bytes], info: datasets.DatasetInfo) -> datasets.Dataset:
    import datasets
    import pyarrow as pa

    lengths = np.fromiter((len(tree) for tree in trees), dtype=np.int64, count=len(trees))
    offsets = np.zeros(len(trees) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.frombuffer(b"".join(trees), dtype=np.int8)
    offset_type = pa.int32() if offsets[-1] < 2**31 else pa.int64()
    list_type = pa.ListArray if offset_type == pa.int32() else pa.LargeListArray
    input_ids = list_type.from_arrays(pa.array(offsets, type=offset_type), pa.array(flat, type=pa.int8()))
    labels = [evaluate_expression(tree) for tree in trees]
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels}, info=info)


def listops(
    num_train: int = 2_000,
    num_validation: int = 200,
    num_test: int = 200,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    max_attempts: int | None = None,
) -> datasets.DatasetDict:
    """LRA ListOps generated locally (in memory, no cache files).

    Returns a ``DatasetDict`` with splits ``train``, ``validation``, ``test`` and columns ``input_ids``
    (variable-length lists of token ids, no padding; see ``LISTOPS_VOCAB``) and ``labels``
    (``ClassLabel`` ``"0".."9"``). The splits are consecutive slices of one de-duplicated generation stream, so
    no sequence appears twice within or across splits, and the output depends only on the arguments.

    The LRA benchmark sizes are ``listops(**LRA_LISTOPS_SPLITS)`` (96k/2k/2k, lengths 500..2000); the defaults
    are smaller because pure-Python generation of LRA-length trees is slow on a few cores. For quick CPU runs use
    short sequences, e.g. ``listops(min_length=20, max_length=120)``.
    """
    import datasets

    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, count in counts.items():
        require_int(f"num_{split}", count, minimum=0)
    _validate(min_length, max_length, max_depth, max_args)
    require_int("seed", seed, minimum=0)
    trees = generate_listops_trees(
        sum(counts.values()),
        min_length=min_length,
        max_length=max_length,
        max_depth=max_depth,
        max_args=max_args,
        seed=seed,
        max_attempts=max_attempts,
    )
    description = (
        f"LRA ListOps generated locally: seed={seed}, {min_length} < length < {max_length}, "
        f"max_depth={max_depth}, max_args={max_args}, operator probability {OPERATOR_PROBABILITY}. "
        f"Token ids: {', '.join(f'{index}={token}' for index, token in enumerate(LISTOPS_VOCAB))}."
    )
    splits = {}
    start = 0
    for split, count in counts.items():
        info = datasets.DatasetInfo(description=description, features=_features(), dataset_name="listops")
        splits[split] = _to_dataset(trees[start : start + count], info)
        start += count
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------- registry facts

#: Command-line options of `listops` (`s4bt train/evaluate/compress ... --task listops`), as fields of
#: `TaskOption` (plain values: this module loads standalone, with numpy only).
LISTOPS_OPTIONS = (
    dict(flag="--listops-min-length", keywords=("min_length",), default=500, help="ListOps: length > this (LRA: 500)"),
    dict(flag="--listops-max-length", keywords=("max_length",), default=2000, minimum=1,
         help="ListOps: length < this (LRA: 2000)"),
    dict(flag="--listops-train", keywords=("num_train",), default=2000, minimum=1, help="ListOps training examples"),
    dict(flag="--listops-eval", keywords=("num_validation", "num_test"), default=200, minimum=1,
         help="ListOps validation and test examples each"),
)

#: `s4bt reproduce --task listops` budgets (fields of `reproduce.Budget`). cpu: a few minutes on 2 CPU
#: cores; paper: the DSS paper's ListOps settings (6 x 128, BatchNorm, full LRA lengths and sizes).
LISTOPS_BUDGETS = {
    "cpu": dict(d_model=32, n_layers=2, d_state=32, ranks=[2, 4, 8, 16], equal_total_ranks=[16],
                originals=[(0, 4), (1, 2), (2, 1)], main_epochs=2, batch_size=50, norm="batch", prenorm=False,
                data={"num_train": 2000, "num_validation": 200, "num_test": 200, "min_length": 20,
                      "max_length": 200}),
    "paper": dict(d_model=128, n_layers=6, d_state=64, ranks=[2, 4, 8, 16, 32], equal_total_ranks=[2, 8, 32],
                  originals=[(0, 50), (1, 25), (2, 10)], main_epochs=50, batch_size=50, norm="batch", prenorm=False,
                  data={"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000, "min_length": 500,
                        "max_length": 2000}, mixed_precision="bf16"),
}


def describe_listops(options: dict) -> str:
    """One sentence on the data, for model cards."""
    return f"Long Range Arena ListOps generated locally ({options})"
