"""The states-removed metric: the budget grid, the validation-chosen budget reported on test
(checked against a hand count), and its table and curves in `compare_reductions`."""

import json

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.experiments.compare_reductions import compare_reductions
from s4bt_hf.experiments.states_removed import budget_grid, states_removed_at, summarise_states_removed


def test_budget_grid_rounds_clips_and_deduplicates():
    assert budget_grid([64, 64, 64, 64], (1 / 64, 2 / 64, 0.5, 1.0)) == [4, 8, 128, 256]
    assert budget_grid([4, 4], (0.01, 0.1, 0.26, 0.5)) == [2, 4]  # at least one mode per layer
    with pytest.raises(ValueError, match="kept fractions"):
        budget_grid([4], (0.0,))


def _row(variant, refit, states, validation, test_correct, total=100, kept_of=200):
    return {"original": "o", "variant": variant, "refit": refit, "states": states, "kept_fraction": states / kept_of,
            "validation_accuracy": validation, "test_accuracy": test_correct / total, "test_correct": test_correct}


def test_the_budget_is_chosen_on_validation_and_reported_on_test():
    original = {"validation_accuracy": 0.90, "test_accuracy": 0.91, "test_correct": 91}
    rows = [_row("bt", False, 20, 0.880, 70), _row("bt", False, 40, 0.8952, 80),  # 0.48 pt: within 0.5
            _row("bt", False, 60, 0.899, 95), _row("bt", False, 100, 0.90, 91),
            _row("last", False, 40, 0.70, 91), _row("last", False, 100, 0.85, 91)]
    entries = {(e["variant"], e["drop"]): e for e in states_removed_at(rows, original, (0.005, 0.01, 0.03))}
    # validation chooses 40 states at 0.5 pt although its test accuracy is poor (test never chooses)
    assert entries[("bt", 0.005)]["states"] == 40 and entries[("bt", 0.005)]["states_removed"] == pytest.approx(0.8)
    assert entries[("bt", 0.005)]["test_samples_lost"] == 11
    assert entries[("bt", 0.005)]["test_points_lost"] == pytest.approx(11.0)
    assert entries[("bt", 0.03)]["states"] == 20
    # nothing within the drop: the original is kept, nothing removed
    assert entries[("last", 0.005)]["states"] is None and entries[("last", 0.005)]["states_removed"] == 0.0
    summary = summarise_states_removed(list(entries.values()))
    assert {(row["variant"], row["drop"]): row["states_removed"] for row in summary}[("bt", 0.01)] == \
        pytest.approx(0.8)


def test_compare_reductions_writes_curves_and_the_states_removed_table(tmp_path):
    torch.manual_seed(0)
    config = S4DSSConfig(vocab_size=18, pad_token_id=0, num_labels=10, d_model=4, n_layers=2, d_state=4)
    S4DSSForSequenceClassification(config).save_pretrained(tmp_path / "model")
    data = {"num_train": 30, "num_validation": 12, "num_test": 10, "min_length": 10, "max_length": 40}
    original = {"name": "tiny", "model": str(tmp_path / "model"), "task": "listops", "data": data,
                "train_samples": None}
    variants = (("balanced_truncation", "balanced_truncation", {}), ("last", "last", {}))
    results = compare_reductions([original], [1], str(tmp_path / "out"), variants=variants, settings=("uniform",),
                                 calibration_samples=8, batch_size=8, log=lambda message: None,
                                 kept_fractions=(0.25, 0.5, 1.0), drops=(0.005, 0.1))
    curves = results["budget_curves"]
    assert len(curves) == 2 * 2 * 3  # variants x refit x budgets (2, 4, 8 modes per channel)
    assert {row["states"] for row in curves} == {8, 16, 32}
    full = [row for row in curves if row["variant"] == "last" and not row["refit"] and row["states"] == 32]
    assert full[0]["test_accuracy"] == pytest.approx(results["rows"][0]["original_test_accuracy"])
    assert len(results["states_removed"]) == 2 * 2 * 2
    assert results["test_samples"] == 10
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["states_removed_summary"] == results["states_removed_summary"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "removed at ≤ 0.5 pt" in table and "| last | yes |" in table
    assert (tmp_path / "out" / "states_vs_accuracy.png").stat().st_size > 0
