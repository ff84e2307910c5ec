"""What the registry (`s4bt_hf.data.TASK_INFOS`) holds about a task: everything an entry point
needs (model inputs, the dataset builder, its command-line options, a description for model
cards, the budgets of `s4bt reproduce`), so that no entry point branches on task names. A new
task is one file in `data/` (builder and these facts) plus one entry in the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

InputKind = Literal["values", "tokens"]


@dataclass(frozen=True)
class TaskOption:
    """A command-line option of a task's builder: `--flag N` sets the builder's `keywords` (one
    flag may set several, e.g. the validation and the test size) to an int >= `minimum`."""

    flag: str
    keywords: tuple[str, ...]
    default: int
    help: str
    minimum: int = 0


@dataclass(frozen=True)
class TaskInfo:
    """What a trainer needs to configure a model for a task.

    ``input_kind`` is ``"values"`` (the model reads ``input_values`` of shape ``(B, L, input_dim)``) or
    ``"tokens"`` (``input_ids`` with a vocabulary of ``vocab_size`` and padding id ``pad_token_id``).
    The remaining fields (not part of equality) drive the entry points: ``builder`` returns the
    ``DatasetDict``, ``options`` are its command-line options (``TaskOption``s or dicts of their
    fields), ``describe(data_options)`` is one sentence for model cards, and ``budgets`` maps a
    `s4bt reproduce` budget name to the fields of its ``reproduce.Budget``.
    """

    name: str
    input_kind: InputKind
    num_labels: int
    input_dim: int | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None
    builder: Callable | None = field(default=None, compare=False, repr=False)
    options: tuple[TaskOption, ...] = field(default=(), compare=False, repr=False)
    describe: Callable[[dict], str] | None = field(default=None, compare=False, repr=False)
    budgets: dict = field(default_factory=dict, compare=False, repr=False)
    # user data (`user_data.load_user_task`): what the labels are, and the preprocessor fitted on the
    # training split (an `S4DSSFeatureExtractor`, or the tokenizer), saved with the model
    problem_type: str | None = field(default=None, compare=False)
    id2label: dict | None = field(default=None, compare=False, repr=False)
    preprocessor: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):  # options may be given as the fields of TaskOption
        options = tuple(option if isinstance(option, TaskOption) else TaskOption(**option) for option in self.options)
        object.__setattr__(self, "options", options)

    def model_labels(self) -> dict:
        """The `S4DSSConfig` fields of the model's outputs: `num_labels`, and for user data the
        problem type and the label names (`id2label`/`label2id`)."""
        fields = {"num_labels": self.num_labels}
        if self.problem_type is not None:
            fields["problem_type"] = self.problem_type
        if self.id2label is not None:
            fields["id2label"] = dict(self.id2label)
            fields["label2id"] = {name: index for index, name in self.id2label.items()}
        return fields

    def model_inputs(self) -> dict:
        """The `S4DSSConfig` fields of the model's inputs for this task."""
        if self.input_kind == "tokens":
            return {"vocab_size": self.vocab_size, "pad_token_id": self.pad_token_id}
        return {"input_dim": self.input_dim}
