"""The stages of `s4bt reproduce` that measure compression the way the field does, on the run's own
originals (budgets with `peer_comparison` / `shrink_drops`, e.g. `--budget strong`):

    peers-s<seed>    every reduction method, LAST and AIRE included, with and without the refit,
                     at a grid of model-wide budgets: accuracy against SSM states kept, and the
                     share of states removed at a drop of at most 0.5 / 1 point (chosen on
                     validation, reported on test; `states_removed.py`)
    shrink-s<seed>   `model.shrink` at each of `shrink_drops` (every method, with and without the
                     refit): the smallest model within the drop on validation, its test accuracy
    hankel-peers-s<seed>-e<epochs>-w<λ>
                     with `--compression-aware`: the same curves for the Hankel-regularised
                     originals (the balanced methods, LAST and AIRE), hankelreg's setting

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
    states_removed_at,
    states_removed_table,
    summarise_states_removed,
)

CALIBRATION_SAMPLES = 200  # training examples of the refit, as in `s4bt compare-reductions`
# the Hankel-regularised originals: the methods the penalty is meant for (Hankel singular values)
# and the two peers; the two modal truncations, which it does not target, are left out to save time
REGULARISED_VARIANTS = tuple(variant for variant in DEFAULT_VARIANTS
                             if variant[0] in ("balanced_truncation", "singular_perturbation", "h2", "last", "aire"))


def peer_stage(experiment, seed: int, epochs: int, original: dict) -> dict:
    """The `peers-s<seed>` stage of one original: {"curve", "states_removed", "test_samples", ...}."""
    config = {**experiment.common, "original": experiment.cache.relative(original["model"]),
              "variants": [list(variant) for variant in DEFAULT_VARIANTS],
              "kept_fractions": list(DEFAULT_KEPT_FRACTIONS), "drops": list(DEFAULT_DROPS),
              "calibration_samples": CALIBRATION_SAMPLES}
    return experiment.stage(f"peers-s{seed}-e{epochs}", config, _measure, experiment=experiment,
                            label=f"seed {seed}", path=original["model"], variants=DEFAULT_VARIANTS)


def regularised_peer_stage(experiment, seed: int, epochs: int, weight: float, original: dict) -> dict:
    """The `hankel-peers-s<seed>-e<epochs>-w<λ>` stage: the curves of `peer_stage` for a
    Hankel-regularised original, with `REGULARISED_VARIANTS`; drops against that original."""
    config = {**experiment.common, "original": experiment.cache.relative(original["model"]), "hankel_weight": weight,
              "variants": [list(variant) for variant in REGULARISED_VARIANTS],
              "kept_fractions": list(DEFAULT_KEPT_FRACTIONS), "drops": list(DEFAULT_DROPS),
              "calibration_samples": CALIBRATION_SAMPLES}
    return experiment.stage(f"hankel-peers-s{seed}-e{epochs}-w{weight:g}", config, _measure, experiment=experiment,
                            label=f"seed {seed}, Hankel-regularised", path=original["model"],
                            variants=REGULARISED_VARIANTS)


def collect_peers(stages: list[dict]) -> dict:
    """The peer stages of every original together: {"curves", "states_removed", "summary", ...}."""
    removed = [entry for stage in stages for entry in stage["states_removed"]]
    return {"curves": [row for stage in stages for row in stage["curve"]], "states_removed": removed,
            "summary": summarise_states_removed(removed), "test_samples": stages[-1]["test_samples"],
            "drops": list(DEFAULT_DROPS)}


def collect_regularised_peers(stages: list[dict], weight: float, plain: list[dict] | None) -> dict:
    """The regularised peer stages together (`collect_peers`), with the states removed against the
    unregularised originals when their peer stages (`plain`, same seeds in order) ran."""
    collected = {**collect_peers(stages), "hankel_weight": weight}
    if plain:
        vs_plain = against_unregularised(stages, plain)
        collected.update(states_removed_vs_unregularised=vs_plain,
                         summary_vs_unregularised=summarise_states_removed(vs_plain))
    return collected


def against_unregularised(regularised: list[dict], plain: list[dict]) -> list[dict]:
    """The states removed from each regularised original (`regularised_peer_stage` results), with
    the drop measured against the UNREGULARISED original of the same seed (`peer_stage` results, in
    the same order): what the penalty and the reduction cost together."""
    entries = []
    for mine, reference in zip(regularised, plain, strict=True):
        samples = reference["test_samples"]
        original = {"validation_accuracy": reference["original_validation_accuracy"],
                    "test_accuracy": reference["original_test_accuracy"],
                    "test_correct": round(reference["original_test_accuracy"] * samples)}
        entries += states_removed_at(mine["curve"], original, DEFAULT_DROPS)
    return entries


def _measure(folder: str, experiment, label: str, path: str, variants) -> dict:
    model = S4DSSForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return measure_states_removed(label, model, experiment.splits, experiment.collate, variants, (False, True),
                                  DEFAULT_KEPT_FRACTIONS, DEFAULT_DROPS, _calibration(experiment),
                                  experiment.budget.eval_batch_size, experiment.log)


def _calibration(experiment) -> list[dict]:
    return dataset_batches(experiment.splits["train"], experiment.budget.eval_batch_size, experiment.collate,
                           samples=CALIBRATION_SAMPLES, labels=False)


def shrink_stages(experiment, seed: int, epochs: int, original: dict) -> list[dict]:
    """The `shrink-s<seed>-d<drop>` stages of one original: one row per drop of the budget."""
    rows = []
    for drop in experiment.budget.shrink_drops:
        config = {**experiment.common, "original": experiment.cache.relative(original["model"]), "max_drop": drop,
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


def field_metric_tables(peers: dict | None, shrink_rows: list[dict], regularised: dict | None = None) -> str:
    """results.md's part: the states-removed table, the shrink results and, with `regularised`
    (`collect_regularised_peers`), the tables of the Hankel-regularised originals."""
    parts = []
    if peers:
        parts.append(states_removed_table(peers["summary"], peers["drops"], peers["test_samples"]))
    if regularised:
        weight = f"{regularised['hankel_weight']:g}"
        parts.append(f"Hankel-regularised originals (λ = {weight}), the drop against each regularised original:\n\n"
                     + states_removed_table(regularised["summary"], regularised["drops"], regularised["test_samples"]))
        if regularised.get("summary_vs_unregularised"):
            parts.append(f"Hankel-regularised originals (λ = {weight}), the drop against the UNREGULARISED original "
                         "of the same seed (the penalty's cost counted too):\n\n"
                         + states_removed_table(regularised["summary_vs_unregularised"], regularised["drops"],
                                                regularised["test_samples"]))
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
