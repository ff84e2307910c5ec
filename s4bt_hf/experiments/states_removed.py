"""The field's compression metric (LAST, AIRE-Prune, hankelreg report it): the largest share of SSM
states a method removes, without retraining, while the accuracy drops by at most 0.5 (or 1) point.

Every method (with and without the data-aware refit) reduces each original to a grid of
model-wide budgets (m = Σ_l r_l modes per channel, S = d_model · m states; each method splits
the budget between layers by its own rule). The budget is CHOSEN on the validation split — the
smallest S whose validation accuracy is within the drop of the original's — and REPORTED on the
test split (accuracy, points and samples lost), so that test numbers never choose anything.
"""

from __future__ import annotations

import time

from ..data.collate import dataset_batches
from ..evaluation_s4dss import evaluation_metrics

# fractions of the original's states kept: mean ranks 1, 2, 3, 4, 6, 8, 12, 16, 24, 32 of 64
DEFAULT_KEPT_FRACTIONS = (1 / 64, 2 / 64, 3 / 64, 4 / 64, 6 / 64, 8 / 64, 12 / 64, 16 / 64, 24 / 64, 32 / 64)
DEFAULT_DROPS = (0.005, 0.01)  # accuracy, as fractions: 0.5 and 1 point


def budget_grid(layer_d_states: list[int], fractions) -> list[int]:
    """Modes per channel m = round(f · Σ_l N_l) for each kept fraction f, at least one per layer and
    at most the original's, without repeats (ascending)."""
    total = sum(layer_d_states)
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"kept fractions must lie in (0, 1], got {fraction!r}")
    return sorted({min(total, max(len(layer_d_states), round(fraction * total))) for fraction in fractions})


def accuracy_and_correct(model, batches) -> tuple[float, int]:
    metrics = evaluation_metrics(model, batches)
    return metrics["accuracy"], round(metrics["accuracy"] * metrics["samples"])


def budget_curve(name: str, model, variants, refits, grid: list[int], validation: list[dict], test: list[dict],
                 calibration: list[dict] | None, log) -> list[dict]:
    """Validation and test accuracy of every variant (label, method, options), with and without
    the refit (`refits`), at every budget m of `grid`; one row each."""
    d_model, total = model.config.d_model, sum(model.config.layer_d_states)
    rows = []
    for label, method, options in variants:
        for refit in refits:
            for modes in grid:
                started = time.perf_counter()
                reduced = model.reduce(method, budget=modes * d_model, calibration_data=calibration if refit else None,
                                       **options)
                seconds = time.perf_counter() - started
                validation_accuracy, _ = accuracy_and_correct(reduced, validation)
                test_accuracy, test_correct = accuracy_and_correct(reduced, test)
                rows.append({"original": name, "variant": label, "refit": refit, "modes_per_channel": modes,
                             "states": modes * d_model, "kept_fraction": modes / total,
                             "ranks": list(reduced.config.layer_d_states), "validation_accuracy": validation_accuracy,
                             "test_accuracy": test_accuracy, "test_correct": test_correct,
                             "reduce_seconds": round(seconds, 3)})
                log(f"{name} {label}{' + refit' if refit else ''} {modes * d_model} states: validation "
                    f"{validation_accuracy:.4f}, test {test_accuracy:.4f}")
    return rows


def measure_states_removed(name: str, model, splits, collate, variants, refits, kept_fractions, drops,
                           calibration: list[dict] | None, batch_size: int, log) -> dict:
    """The curves (`budget_curve`) and the states removed at each drop (`states_removed_at`) of one
    original on its task's validation and test splits."""
    validation = dataset_batches(splits["validation"], batch_size, collate)
    test = dataset_batches(splits["test"], batch_size, collate)
    validation_accuracy, _ = accuracy_and_correct(model, validation)
    test_accuracy, test_correct = accuracy_and_correct(model, test)
    grid = budget_grid(model.config.layer_d_states, kept_fractions)
    curve = budget_curve(name, model, variants, refits, grid, validation, test, calibration, log)
    for row in curve:
        row.update(original_validation_accuracy=validation_accuracy, original_test_accuracy=test_accuracy)
    reference = {"validation_accuracy": validation_accuracy, "test_accuracy": test_accuracy,
                 "test_correct": test_correct}
    return {"curve": curve, "states_removed": states_removed_at(curve, reference, drops),
            "test_samples": len(splits["test"]), "original_validation_accuracy": validation_accuracy,
            "original_test_accuracy": test_accuracy}


def states_removed_at(rows: list[dict], original: dict, drops) -> list[dict]:
    """Per (variant, refit, drop): the smallest budget whose validation accuracy is within `drop`
    of the original's (ties: the better validation accuracy), with its test accuracy, the points
    and test samples lost. `original` holds the original's validation_accuracy, test_accuracy,
    test_correct and test_samples. No budget within the drop: removed share 0 (the original kept)."""
    results = []
    groups = {}
    for row in rows:
        groups.setdefault((row["variant"], row["refit"]), []).append(row)
    for (variant, refit), members in groups.items():
        for drop in drops:
            within = [row for row in members
                      if original["validation_accuracy"] - row["validation_accuracy"] <= drop + 1e-12]
            chosen = min(within, key=lambda row: (row["states"], -row["validation_accuracy"]), default=None)
            entry = {"original": members[0]["original"], "variant": variant, "refit": refit, "drop": drop}
            if chosen is None:
                entry.update(states_removed=0.0, states=None, validation_accuracy=original["validation_accuracy"],
                             test_accuracy=original["test_accuracy"], test_points_lost=0.0, test_samples_lost=0)
            else:
                entry.update(states_removed=1 - chosen["kept_fraction"], states=chosen["states"],
                             validation_accuracy=chosen["validation_accuracy"],
                             test_accuracy=chosen["test_accuracy"],
                             test_points_lost=100 * (original["test_accuracy"] - chosen["test_accuracy"]),
                             test_samples_lost=original["test_correct"] - chosen["test_correct"])
            results.append(entry)
    return results


def summarise_states_removed(entries: list[dict]) -> list[dict]:
    """Mean over originals per (variant, refit, drop), with the per-original values."""
    groups = {}
    for entry in entries:
        groups.setdefault((entry["variant"], entry["refit"], entry["drop"]), []).append(entry)
    summary = []
    for (variant, refit, drop), members in groups.items():
        count = len(members)
        summary.append({"variant": variant, "refit": refit, "drop": drop, "originals": count,
                        "states_removed": sum(m["states_removed"] for m in members) / count,
                        "test_points_lost": sum(m["test_points_lost"] for m in members) / count,
                        "per_original_states_removed": [m["states_removed"] for m in members],
                        "per_original_test_samples_lost": [m["test_samples_lost"] for m in members]})
    return summary


def states_removed_table(summary: list[dict], drops, test_samples: int | None) -> str:
    """Markdown: one row per method (and refit), per drop the mean share of states removed (per
    original in brackets) and the test points lost (test samples lost per original)."""
    header = "| method | refit | " + " | ".join(
        f"removed at ≤ {100 * drop:g} pt (per original) | test pt lost (samples lost)" for drop in drops) + " |"
    lines = ["Largest share of SSM states removed without retraining at a validation accuracy drop of at most "
             + " / ".join(f"{100 * drop:g}" for drop in drops) + " point(s): the budget chosen on the validation "
             "split, reported on the test split" + (f" ({test_samples} samples: one sample is "
                                                    f"{100 / test_samples:.2g} points)" if test_samples else "")
             + ".", "", header, "|---|---|" + "---|---|" * len(drops)]
    by_key = {(row["variant"], row["refit"], row["drop"]): row for row in summary}
    for variant, refit in dict.fromkeys((row["variant"], row["refit"]) for row in summary):
        cells = []
        for drop in drops:
            row = by_key[(variant, refit, drop)]
            per = ", ".join(f"{100 * value:.1f}" for value in row["per_original_states_removed"])
            lost = ", ".join(str(value) for value in row["per_original_test_samples_lost"])
            cells += [f"{100 * row['states_removed']:.1f} % ({per})", f"{row['test_points_lost']:.2f} ({lost})"]
        lines.append(f"| {variant} | {'yes' if refit else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
