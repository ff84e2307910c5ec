"""The stages of `s4bt reproduce` that measure compression the way the field does, on the run's own
originals (budgets with `peer_comparison` / `shrink_drops`, e.g. `--budget strong`):

    peers-s<seed>    every reduction method, LAST and AIRE included, with and without the refit,
                     at a grid of model-wide budgets: accuracy against SSM states kept, and the
                     share of states removed at a drop of at most 0.5 / 1 point (chosen on
                     validation, reported on test; `states_removed.py`)
    shrink-s<seed>   `model.shrink` at each of `shrink_drops` (every method, with and without the
                     refit): the smallest model within the drop on validation, its test accuracy

Each stage is cached like the others (its configuration's hash in the folder name).
"""

from __future__ import annotations

import os
import shutil

import torch

from ..data.collate import dataset_batches
from ..modeling_s4dss import S4DSSForSequenceClassification
from ..reduction_methods import REDUCTION_METHODS
from ..training import evaluate_dataset
from .compare_reductions import DEFAULT_VARIANTS
from .states_removed import (
    DEFAULT_DROPS,
    DEFAULT_KEPT_FRACTIONS,
    measure_states_removed,
    states_removed_table,
    summarise_states_removed,
)

CALIBRATION_SAMPLES = 200  # training examples of the refit, as in `s4bt compare-reductions`


def peer_stage(experiment, seed: int, epochs: int, original: dict) -> dict:
    """The `peers-s<seed>` stage of one original: {"curve", "states_removed", "test_samples", ...}."""
    config = {**experiment.common, "original": original["model"],
              "variants": [list(variant) for variant in DEFAULT_VARIANTS],
              "kept_fractions": list(DEFAULT_KEPT_FRACTIONS), "drops": list(DEFAULT_DROPS),
              "calibration_samples": CALIBRATION_SAMPLES}
    return experiment.stage(f"peers-s{seed}-e{epochs}", config, _measure, experiment=experiment,
                            label=f"seed {seed}", path=original["model"])


def collect_peers(stages: list[dict]) -> dict:
    """The peer stages of every original together: {"curves", "states_removed", "summary", ...}."""
    removed = [entry for stage in stages for entry in stage["states_removed"]]
    return {"curves": [row for stage in stages for row in stage["curve"]], "states_removed": removed,
            "summary": summarise_states_removed(removed), "test_samples": stages[-1]["test_samples"],
            "drops": list(DEFAULT_DROPS)}


def _measure(folder: str, experiment, label: str, path: str) -> dict:
    model = S4DSSForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return measure_states_removed(label, model, experiment.splits, experiment.collate, DEFAULT_VARIANTS, (False, True),
                                  DEFAULT_KEPT_FRACTIONS, DEFAULT_DROPS, _calibration(experiment),
                                  experiment.budget.eval_batch_size, experiment.log)


def _calibration(experiment) -> list[dict]:
    return dataset_batches(experiment.splits["train"], experiment.budget.eval_batch_size, experiment.collate,
                           samples=CALIBRATION_SAMPLES, labels=False)


def shrink_stages(experiment, seed: int, epochs: int, original: dict) -> list[dict]:
    """The `shrink-s<seed>-d<drop>` stages of one original: one row per drop of the budget."""
    rows = []
    for drop in experiment.budget.shrink_drops:
        config = {**experiment.common, "original": original["model"], "max_drop": drop,
                  "methods": list(REDUCTION_METHODS), "refit": [False, True],
                  "calibration_samples": CALIBRATION_SAMPLES}
        result = experiment.stage(f"shrink-s{seed}-e{epochs}-d{drop:g}", config, _shrink, experiment=experiment,
                                  path=original["model"], drop=drop)
        rows.append({"seed": seed, "drop": drop, **result})
    return rows


def _shrink(folder: str, experiment, path: str, drop: float) -> dict:
    model = S4DSSForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    size = experiment.budget.eval_batch_size
    validation = dataset_batches(experiment.splits["validation"], size, experiment.collate)
    shrunk = model.shrink(validation, drop, refit=[False, True], calibration_data=_calibration(experiment),
                          log=experiment.log)
    target = os.path.join(folder, "model")
    if os.path.exists(target):  # a half-written model from an interrupted run
        shutil.rmtree(target)
    shrunk.save_pretrained(target)
    test = evaluate_dataset(shrunk, experiment.splits["test"], size, experiment.collate)["accuracy"]
    original_test = evaluate_dataset(model, experiment.splits["test"], size, experiment.collate)["accuracy"]
    report = shrunk.shrink_report
    best = report.best
    return {"model": target, "original_test_accuracy": original_test, "test_accuracy": test,
            "original_validation_accuracy": report.original_value,
            "validation_accuracy": report.original_value if best is None else best.value,
            "method": None if best is None else best.method, "refit": None if best is None else best.refit,
            "states": report.original_states if best is None else best.states,
            "states_removed": 0.0 if best is None else best.states_removed,
            "evaluations": report.evaluations, "search_seconds": report.seconds, "report": report.to_dict()}


def field_metric_tables(peers: dict | None, shrink_rows: list[dict]) -> str:
    """results.md's part: the states-removed table and the shrink results."""
    parts = []
    if peers:
        parts.append(states_removed_table(peers["summary"], peers["drops"], peers["test_samples"]))
    if shrink_rows:
        lines = ["`model.shrink` (every method, with and without the refit; validation-chosen, test-reported):", "",
                 "| seed | max drop (pt) | method | refit | states kept | removed | validation (original) "
                 "| test (original) | candidates evaluated |", "|---|---|---|---|---|---|---|---|---|"]
        for row in shrink_rows:
            lines.append(f"| {row['seed']} | {100 * row['drop']:g} | {row['method'] or '— (none within)'} | "
                         f"{'—' if row['refit'] is None else 'yes' if row['refit'] else 'no'} | {row['states']} | "
                         f"{100 * row['states_removed']:.1f} % | {100 * row['validation_accuracy']:.1f} "
                         f"({100 * row['original_validation_accuracy']:.1f}) | {100 * row['test_accuracy']:.1f} "
                         f"({100 * row['original_test_accuracy']:.1f}) | {row['evaluations']} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
