"""`s4bt shrink`: the smallest reduced model within a validation tolerance (`model.shrink`), on a
built-in task or the user's data, optionally retrained (the paper's main training).

    s4bt shrink --model runs/smnist/best --task smnist --max-drop 0.5 --output runs/smnist-shrunk
                [--methods balanced_truncation last] [--refit no|yes|both] [--retrain-epochs 5]

The output folder gets shrunk/ (the model, its card and preprocessor), shrink_report.json and
shrink_report.md (every candidate), and with --retrain-epochs a training run folder retrained/.
A re-run into the same folder reuses shrunk/ and resumes an interrupted retraining.
"""

from __future__ import annotations

import json
import os
import shutil

from ..data import TASK_INFOS
from ..reduction_methods import REDUCTION_METHODS
from ..shrink_search import REPORT_FILE, ShrinkReport
from .arg_types import nonnegative_float, nonnegative_int, positive_float, positive_int
from .data_options import add_user_data_options

REFIT_CHOICES = {"no": [False], "yes": [True], "both": [False, True]}
SHRUNK_FOLDER = "shrunk"
RETRAINED_FOLDER = "retrained"
SETTINGS_FILE = "shrink_settings.json"


def add_shrink_parser(commands, add_data_options) -> None:
    shrink = commands.add_parser(
        "shrink", help="the smallest reduced model within a validation tolerance (optionally retrained)",
        description="Search reduction methods and model-wide budgets for the model with the fewest SSM states "
        "whose validation accuracy (F1 for multi-label, MSE for regression) is within --max-drop of the original's; "
        "writes it with a report of every candidate tried, its test metrics, and optionally retrains it.")
    shrink.add_argument("--model", required=True, help="folder of a saved S4-DSS model")
    shrink.add_argument("--output", required=True, help="new folder (or one an interrupted shrink wrote)")
    shrink.add_argument("--task", choices=tuple(TASK_INFOS),
                        help="a built-in task (or your own data: --train-file / --dataset)")
    shrink.add_argument("--max-drop", type=nonnegative_float, default=0.5,
                        help="points of validation accuracy (or F1) that may be lost (default 0.5); for regression, "
                        "the percent the MSE may grow")
    shrink.add_argument("--methods", nargs="+", choices=tuple(REDUCTION_METHODS), default=list(REDUCTION_METHODS),
                        help="reduction methods searched (default: all)")
    shrink.add_argument("--refit", choices=tuple(REFIT_CHOICES), default="both",
                        help="candidates with the data-aware refit on training inputs, without, or both (default)")
    shrink.add_argument("--refit-samples", type=positive_int, default=200,
                        help="training examples for the refit (default 200)")
    shrink.add_argument("--batch-size", type=positive_int, default=100, help="evaluation batch size (default 100)")
    retrain = shrink.add_argument_group("main training of the result (the paper's retraining)")
    retrain.add_argument("--retrain-epochs", type=positive_int, help="epochs (default: none)")
    retrain.add_argument("--lr", type=positive_float, default=1e-2, help="learning rate (default 1e-2)")
    retrain.add_argument("--train-batch-size", type=positive_int, default=32, help="per process (default 32)")
    retrain.add_argument("--seed", type=nonnegative_int, default=0)
    retrain.add_argument("--no-progress", action="store_true")
    add_data_options(shrink)
    add_user_data_options(shrink, "the search")


def command_shrink(args) -> dict:
    from ..data import task_info
    from ..data.collate import PadCollator, dataset_batches
    from ..training.evaluation import evaluate_dataset
    from .commands import (
        CliError,
        _check_output_folder,
        check_model_fits_task,
        load_data,
        load_model,
        resolve_data,
        save_model_folder,
    )

    _check_output_folder(args.output)
    resolve_data(args)
    if args.max_drop >= 100:
        raise CliError(f"--max-drop {args.max_drop:g} points leaves nothing to keep; give less than 100")
    settings = {"model": os.path.abspath(args.model), "task": args.task, "max_drop": args.max_drop,
                "methods": args.methods, "refit": args.refit, "refit_samples": args.refit_samples,
                "data_seed": args.data_seed, "train_samples": args.train_samples}
    shrunk_folder = os.path.join(args.output, SHRUNK_FOLDER)
    report_path = os.path.join(args.output, REPORT_FILE)
    model = load_model(args.model)
    check_model_fits_task(model.config, args.task)
    info = task_info(args.task)
    splits, _ = load_data(args)
    collate = PadCollator(info.pad_token_id or 0)
    if len(splits["validation"]) == 0:
        raise CliError(f"the validation split of {args.task} is empty: there is nothing to choose the model on")
    _check_resumable(args.output, settings, CliError)  # the first write: bad input above leaves nothing

    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as handle:
            report = ShrinkReport.from_dict(json.load(handle)["search"])
    else:
        validation = dataset_batches(splits["validation"], args.batch_size, collate)
        refits = REFIT_CHOICES[args.refit]
        calibration = (dataset_batches(splits["train"], 50, collate, samples=args.refit_samples, labels=False)
                       if any(refits) else None)
        try:
            shrunk = model.shrink(validation, args.max_drop / 100, methods=args.methods, refit=refits,
                                  calibration_data=calibration, log=_progress(args))
        except (TypeError, ValueError) as error:
            raise CliError(str(error)) from error
        report = shrunk.shrink_report
        test = {}
        if "test" in splits and len(splits["test"]):
            test = {"original": evaluate_dataset(model, splits["test"], args.batch_size, collate),
                    "shrunk": evaluate_dataset(shrunk, splits["test"], args.batch_size, collate)}
        if os.path.isdir(shrunk_folder):  # saved by this shrink, cut off before its report: redone
            shutil.rmtree(shrunk_folder)
        save_model_folder(shrunk, shrunk_folder, args.model, "the shrunk model")
        summary = {"settings": settings, "search": report.to_dict(), "test": test}
        with open(report_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(report_path + ".tmp", report_path)  # written last: its presence means the search is done
        with open(os.path.join(args.output, "shrink_report.md"), "w", encoding="utf-8") as handle:
            handle.write(report.to_markdown() + _test_lines(test))
    with open(report_path, encoding="utf-8") as handle:
        test = json.load(handle)["test"]
    best = report.best
    result = {"output": args.output, "model": shrunk_folder, "metric": report.metric,
              "original_validation": report.original_value, "evaluations": report.evaluations,
              "chosen": None if best is None else {"method": best.method, "refit": best.refit, "states": best.states,
                                                   "states_removed": round(best.states_removed, 4),
                                                   "validation": best.value},
              "test": {name: {key: value for key, value in metrics.items() if key != "samples"}
                       for name, metrics in test.items()}}
    if args.retrain_epochs:
        result["retrained"] = _retrain(args, shrunk_folder)
    return result


def _check_resumable(output: str, settings: dict, error_class) -> None:
    """A new or empty folder, or one this very shrink wrote (same settings): anything else is refused."""
    if not os.path.isdir(output) or not os.listdir(output):
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, SETTINGS_FILE), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)
        return
    path = os.path.join(output, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except (OSError, ValueError):
        raise error_class(f"{output} exists and is not a shrink folder; choose a new folder") from None
    if previous != settings:
        changed = sorted(key for key in settings if previous.get(key) != settings[key])
        raise error_class(f"{output} holds a shrink with other settings ({', '.join(changed)}); choose a new folder")


def _progress(args):
    import sys

    if args.no_progress:
        return None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _test_lines(test: dict) -> str:
    if not test:
        return ""
    lines = ["", "Test split (not used by the search):", ""]
    for name, metrics in test.items():
        values = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "samples")
        lines.append(f"- {name}: {values} ({metrics['samples']} samples)")
    return "\n".join(lines) + "\n"


def _retrain(args, shrunk_folder: str) -> dict:
    """Main training of the shrunk model: `s4bt train --init-from shrunk/`, into retrained/."""
    from .commands import build_parser, command_train

    output = os.path.join(args.output, RETRAINED_FOLDER)
    train_args = build_parser().parse_args(["train", "--output", output, "--init-from", shrunk_folder,
                                            "--epochs", str(args.retrain_epochs), "--lr", str(args.lr),
                                            "--batch-size", str(args.train_batch_size), "--seed", str(args.seed)])
    # the data exactly as the search read them (a user dataset is already registered under args.task)
    for name in ("task", "data_seed", "train_samples", *_task_option_names()):
        setattr(train_args, name, getattr(args, name))
    train_args.no_progress = args.no_progress
    return command_train(train_args)


def _task_option_names() -> list[str]:
    from .commands import _task_options

    return [option.flag.lstrip("-").replace("-", "_") for option in _task_options()]
