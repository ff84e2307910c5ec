"""The no-retraining benchmark: every reduction method at every rank on trained originals, with
and without the data-aware refit, one rank everywhere against a model-wide budget of the same
total size; test accuracy WITHOUT any retraining, wall time and kernel errors. Then the field's
metric (`states_removed.py`): accuracy against SSM states kept over a grid of model-wide budgets,
and the largest share of states removed at a drop of at most 0.5 and 1 point (chosen on
validation, reported on test). Writes results.json, results.md, keep_ratio.png and
states_vs_accuracy.png (`s4bt compare-reductions`)."""

from __future__ import annotations

import glob
import json
import os
import time

import torch

from ..data import load_task, task_info
from ..data.collate import PadCollator, dataset_batches
from ..modeling_s4dss import S4DSSForSequenceClassification
from ..reduction_methods import REDUCTION_METHODS
from ..training import evaluate_dataset
from .stage_cache import read_stage_result
from .states_removed import (
    DEFAULT_DROPS,
    DEFAULT_KEPT_FRACTIONS,
    measure_states_removed,
    states_removed_table,
    summarise_states_removed,
)

# (label, method, options): modal truncation is shown twice, with and without the DC gain kept
DEFAULT_VARIANTS = (
    ("balanced_truncation", "balanced_truncation", {}),
    ("singular_perturbation", "singular_perturbation", {}),
    ("modal_truncation", "modal_truncation", {}),
    ("modal_truncation+dc", "modal_truncation", {"match_dc": True}),
    ("h2", "h2", {}),
    ("last", "last", {}),
    ("aire", "aire", {}),
)
SETTINGS = ("uniform", "uniform+refit", "budget", "budget+refit")


def originals_of_reproduce(folder: str, regularised: bool = False) -> list[dict]:
    """The pre-trained originals of a `s4bt reproduce` folder: model path, task and data options.
    With `regularised`, the Hankel-regularised originals of its compression-aware arm instead,
    those of the λ (and `hankel_every`) that the run chose on validation (read from results.json)."""
    wanted = _chosen_hankel_setting(folder) if regularised else None
    pattern = "hankel-pretrain-*" if regularised else "pretrain-*"
    originals = []
    for stage in sorted(glob.glob(os.path.join(folder, "stages", pattern))):
        result_path = os.path.join(stage, "result.json")
        if not os.path.isfile(result_path):
            continue
        with open(os.path.join(stage, "stage_config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        if wanted is not None and (config.get("hankel_weight"), config.get("hankel_every"),
                                   config.get("hankel_reuse", False)) != wanted:
            continue  # another λ of the selection grid, or another setting of the penalty
        result = read_stage_result(stage)  # paths resolved against the run folder, wherever it is now
        originals.append({"name": os.path.basename(stage).rsplit("-", 1)[0], "model": result["model"],
                          "task": config["task"], "data": config.get("data") or {},
                          "train_samples": config.get("train_samples")})
    if not originals:
        raise ValueError(f"no finished pre-training stage (stages/{pattern}/result.json) under {folder}"
                         + (f" with the chosen hankel_weight {wanted[0]:g}, hankel_every {wanted[1]} and "
                            f"hankel_reuse {wanted[2]}" if wanted else ""))
    return originals


def _chosen_hankel_setting(folder: str) -> tuple[float, int, bool]:
    """(λ, hankel_every, hankel_reuse) of the compression-aware arm of a finished
    `s4bt reproduce --compression-aware` run."""
    path = os.path.join(folder, "results.json")
    try:
        with open(path, encoding="utf-8") as handle:
            arm = json.load(handle).get("compression_aware")
    except FileNotFoundError:
        arm = None
    if not arm:
        raise ValueError(f"{path} has no compression-aware results: run `s4bt reproduce --compression-aware` "
                         f"into {folder} first")
    settings = arm["settings"]
    return (float(arm["hankel_selection"]["chosen_weight"]), int(settings["hankel_every"]),
            bool(settings.get("hankel_reuse", False)))  # absent: a run from before the option


def calibration_batches(split, samples: int, batch_size: int, collate) -> list[dict]:
    """The first `samples` examples of `split` as model batches (labels dropped)."""
    return dataset_batches(split, batch_size, collate, samples=samples, labels=False)


def compare_reductions(originals: list[dict], ranks: list[int], output: str, variants=DEFAULT_VARIANTS,
                       settings=SETTINGS, calibration_samples: int = 200, batch_size: int = 100,
                       log=print, kept_fractions=DEFAULT_KEPT_FRACTIONS, drops=DEFAULT_DROPS,
                       curve_refits=(False, True)) -> dict:
    """Run the benchmark on `originals` (dicts with name, model, task, data, train_samples) and
    write its outputs to `output` (created; an existing results.json is refused). `kept_fractions`
    (None or empty: no curves) is the budget grid of the states-removed metric, `drops` its
    accuracy drops (fractions), `curve_refits` whether its reductions refit (both by default)."""
    for label, method, _ in variants:
        if method not in REDUCTION_METHODS:
            raise ValueError(f"unknown method {method!r} in variant {label!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if os.path.exists(os.path.join(output, "results.json")):
        raise ValueError(f"{output} already holds results.json; choose a new folder")
    os.makedirs(output, exist_ok=True)
    rows, curves, removed = [], [], []
    test_samples = None
    for original in originals:
        info = task_info(original["task"])
        splits = load_task(original["task"], **original["data"]).with_format("torch")
        collate = PadCollator(info.pad_token_id or 0)
        train_split = splits["train"]
        if original.get("train_samples") is not None:
            train_split = train_split.select(range(min(original["train_samples"], len(train_split))))
        model = S4DSSForSequenceClassification.from_pretrained(original["model"], dtype=torch.float32).eval()
        base = evaluate_dataset(model, splits["test"], batch_size, collate)["accuracy"]
        log(f"{original['name']}: original test accuracy {base:.4f}")
        batches = (calibration_batches(train_split, calibration_samples, batch_size, collate)
                   if any("refit" in setting for setting in settings) or any(curve_refits) else None)
        for rank in ranks:
            for label, method, options in variants:
                for setting in settings:
                    size = ({"budget": rank * model.config.d_model * model.config.n_layers}
                            if setting.startswith("budget") else {"rank": rank})
                    started = time.perf_counter()
                    reduced = model.reduce(method, **size, **options,
                                           calibration_data=batches if setting.endswith("refit") else None)
                    seconds = time.perf_counter() - started
                    accuracy = evaluate_dataset(reduced, splits["test"], batch_size, collate)["accuracy"]
                    rows.append(_row(original, base, rank, label, setting, accuracy, seconds,
                                     reduced.compression_report))
                    log(f"{original['name']} rank {rank} {label} {setting}: {accuracy:.4f} ({seconds:.1f} s)")
        if kept_fractions:
            measured = measure_states_removed(original["name"], model, splits, collate, variants, curve_refits,
                                              kept_fractions, drops, batches, batch_size, log)
            curves += measured["curve"]
            removed += measured["states_removed"]
            test_samples = measured["test_samples"]
    results = {"ranks": list(ranks), "variants": [label for label, _, _ in variants], "settings": list(settings),
               "calibration_samples": calibration_samples, "rows": rows, "summary": summarise(rows)}
    if kept_fractions:
        results.update(kept_fractions=list(kept_fractions), drops=list(drops), test_samples=test_samples,
                       budget_curves=curves, states_removed=removed,
                       states_removed_summary=summarise_states_removed(removed))
    with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(results_table(results))
        if kept_fractions:
            handle.write("\n" + states_removed_table(results["states_removed_summary"], drops, test_samples))
    from .plots import plot_reduction_comparison, plot_states_vs_accuracy

    plot_reduction_comparison(results, os.path.join(output, "keep_ratio.png"))
    if kept_fractions:
        plot_states_vs_accuracy(curves, os.path.join(output, "states_vs_accuracy.png"))
    return results


def _row(original, base, rank, label, setting, accuracy, seconds, report) -> dict:
    relative = [error / norm for layer in report.layers
                for error, norm in zip(layer.kernel_error, layer.kernel_norm, strict=True) if norm > 0]
    return {"original": original["name"], "task": original["task"], "original_test_accuracy": base,
            "rank": rank, "variant": label, "setting": setting, "test_accuracy": accuracy,
            "keep_ratio": accuracy / base if base > 0 else None, "seconds": round(seconds, 3),
            "ranks": [layer.rank for layer in report.layers],
            "mean_relative_kernel_error": sum(relative) / max(len(relative), 1),
            "ssm_parameters": report.ssm_parameters_after}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over originals of accuracy, keep ratio, seconds and kernel error per (rank, variant,
    setting), and the best variant per rank."""
    groups = {}
    for row in rows:
        groups.setdefault((row["rank"], row["variant"], row["setting"]), []).append(row)
    summary = []
    for (rank, variant, setting), members in groups.items():
        def mean(key, members=members):
            values = [member[key] for member in members if member[key] is not None]
            return sum(values) / len(values) if values else None

        summary.append({"rank": rank, "variant": variant, "setting": setting, "originals": len(members),
                        "test_accuracy": mean("test_accuracy"), "keep_ratio": mean("keep_ratio"),
                        "seconds": mean("seconds"), "mean_relative_kernel_error": mean("mean_relative_kernel_error")})
    return summary


def results_table(results: dict) -> str:
    """Markdown: mean keep ratio (accuracy / original accuracy, no retraining) per rank, one column
    per variant and setting; then wall time and kernel error per variant."""
    summary = {(row["rank"], row["variant"], row["setting"]): row for row in results["summary"]}
    lines = ["Test accuracy without retraining as a fraction of the original's (mean over originals).", ""]
    for setting in results["settings"]:
        lines += [f"**{setting}**", "", "| rank | " + " | ".join(results["variants"]) + " |",
                  "|---|" + "---|" * len(results["variants"])]
        for rank in results["ranks"]:
            cells = []
            values = {variant: summary[(rank, variant, setting)]["keep_ratio"] for variant in results["variants"]}
            best = max((value for value in values.values() if value is not None), default=None)
            for variant in results["variants"]:
                cell = "—" if values[variant] is None else f"{100 * values[variant]:.1f} %"
                cells.append(f"**{cell}**" if values[variant] is not None and values[variant] == best else cell)
            lines.append(f"| {rank} | " + " | ".join(cells) + " |")
        lines.append("")
    if "uniform" not in results["settings"]:
        return "\n".join(lines)
    lines += ["Reduction wall time (s) and mean relative kernel error ‖K - K_r‖/‖K‖ (uniform ranks, no refit), "
              "mean over originals:", "", "| rank | " + " | ".join(results["variants"]) + " |",
              "|---|" + "---|" * len(results["variants"])]
    for rank in results["ranks"]:
        cells = [f"{summary[(rank, variant, 'uniform')]['seconds']:.2f} s / "
                 f"{summary[(rank, variant, 'uniform')]['mean_relative_kernel_error']:.3g}"
                 for variant in results["variants"]]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
