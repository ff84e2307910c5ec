"""The data options the subcommands share: a built-in task (`--task`) or the user's own data
(`--train-file`/`--validation-file`/`--test-file` or `--dataset`, with their columns). Either
becomes one `TaskInfo` in the task registry, so every subcommand runs both on the same code path."""

from __future__ import annotations

from ..data import TASK_INFOS
from ..data.user_data import PROBLEM_TYPES, DataError, UserData, load_user_task
from .arg_types import positive_int

USER_TASK_PREFIX = "user:"  # registry names of user data, apart from the built-in tasks'
_USER_FLAGS = ("train_file", "validation_file", "test_file", "dataset")


def add_user_data_options(parser, what: str = "the data") -> None:
    """`--train-file` ... `--dataset-name`: the user's own data, as an alternative to `--task`."""
    group = parser.add_argument_group(f"your own data (instead of --task) for {what}")
    group.add_argument("--train-file", help="CSV, JSON lines (.json/.jsonl) or Parquet file of training examples")
    group.add_argument("--validation-file", help="default: --validation-split-percentage of the training file")
    group.add_argument("--test-file")
    group.add_argument("--dataset", help="a dataset folder: written by save_to_disk, or data files load_dataset reads")
    group.add_argument("--input-columns", nargs="+", default=[], metavar="COLUMN",
                       help="sequence columns: one per channel, or one column of (L, C) sequences "
                       "(default: input_values)")
    group.add_argument("--text-column", help="a text column, with --tokenizer")
    group.add_argument("--tokenizer", help="what AutoTokenizer.from_pretrained loads (a folder)")
    group.add_argument("--label-column", help="default: label, then labels")
    group.add_argument("--problem-type", choices=PROBLEM_TYPES, help="default: from the training labels")
    group.add_argument("--validation-split-percentage", type=positive_int, default=10,
                       help="without a validation split: this share of the training data (default 10)")
    group.add_argument("--max-length", type=positive_int, help="tokens kept per text (default: all)")
    group.add_argument("--dataset-name", help="how model cards name the data (default: the file or folder name)")


def user_data_requested(args) -> bool:
    return any(getattr(args, flag, None) is not None for flag in _USER_FLAGS)


def resolve_task(args, required: bool = True) -> str | None:
    """The registry name of the task the options describe: `--task`, or the user's data read,
    checked and registered under `user:<name>` (`DataError` for bad data, `ValueError` for
    conflicting options). Sets `args.task` to it."""
    if user_data_requested(args):
        if getattr(args, "task", None) is not None:
            raise ValueError("give either --task or your own data (--train-file/--dataset), not both")
        spec = UserData(
            train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
            dataset=args.dataset, input_columns=tuple(args.input_columns), text_column=args.text_column,
            tokenizer=args.tokenizer, label_column=args.label_column, problem_type=args.problem_type,
            validation_split_percentage=args.validation_split_percentage, seed=getattr(args, "data_seed", 0),
            max_length=args.max_length, name=args.dataset_name,
        )
        info = load_user_task(spec)
        # the content's fingerprint in the name: results cached under it belong to these very data
        name = f"{USER_TASK_PREFIX}{info.name}@{spec.fingerprint()}"
        TASK_INFOS[name] = info
        args.task = name
        return name
    if getattr(args, "task", None) is None and required:
        raise ValueError("give the data: --task (a built-in task) or --train-file / --dataset (your own)")
    return getattr(args, "task", None)


__all__ = ["DataError", "USER_TASK_PREFIX", "add_user_data_options", "resolve_task", "user_data_requested"]
