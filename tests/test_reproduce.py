"""The reproduction pipeline on a tiny budget: every output, the stage cache (a re-run skips
everything, a changed setting re-runs only what it changes), equal budgets for both arms."""

import json
import os

import numpy as np
import pytest

from s4bt_hf.reproduce import Budget, default_budgets, pearson, reproduce, results_table

TINY = Budget(d_model=4, n_layers=1, d_state=4, ranks=[1, 2], originals=[(0, 2), (1, 1)], main_epochs=1,
              batch_size=25, train_samples=50, eval_batch_size=250, equal_total_ranks=[2])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    output = tmp_path_factory.mktemp("reproduce") / "run"
    messages = []
    results = reproduce("smnist", str(output), TINY, progress=False, log=messages.append)
    return output, results, messages


def test_outputs(experiment):
    output, results, _ = experiment
    for name in ("results.json", "results.md", "hsv_decay.png", "accuracy_vs_params.png",
                 "original_vs_compressed.png"):
        assert (output / name).stat().st_size > 0, name
    saved = json.loads((output / "results.json").read_text())
    assert saved["per_rank"] == json.loads(json.dumps(results["per_rank"]))
    assert [entry["rank"] for entry in saved["per_rank"]] == [1, 2]
    assert len(saved["runs"]) == 4 and len(saved["baselines"]) == 4
    assert [(row["seed"], row["epochs"]) for row in saved["equal_total_baselines"]] == [(0, 3), (1, 2)]
    assert saved["per_rank"][0]["skew_hippo_equal_total_epochs"] is None
    assert saved["per_rank"][1]["skew_hippo_equal_total_epochs"]["n"] == 2
    for entry in saved["per_rank"]:
        for arm in ("original", "truncated", "bt_retrained", "skew_hippo_baseline"):
            assert entry[arm]["n"] == 2 and 0 <= entry[arm]["mean"] <= 1
        assert entry["bt_minus_baseline"] == pytest.approx(entry["bt_retrained"]["mean"]
                                                           - entry["skew_hippo_baseline"]["mean"])
    # SSM parameters per rank: 1 layer x 4 channels x (log_dt + D + r x (log_A_real, A_imag, B, C as pairs))
    assert [entry["ssm_parameters"] for entry in saved["per_rank"]] == [4 * (2 + 6 * 1), 4 * (2 + 6 * 2)]
    table = (output / "results.md").read_text()
    assert table.startswith("Task smnist") and table.count("\n| ") == 3 and "| — | — |" in table
    for rank in (1, 2):
        card = (output / "models" / f"bt_r{rank}" / "README.md").read_text()
        assert "## Experiment" in card and "Balanced truncation" in card and "mlxtend" in card
        assert json.loads((output / "models" / f"bt_r{rank}" / "config.json").read_text())["d_state"] == rank


def test_both_arms_get_the_same_budget(experiment):
    output, _, _ = experiment
    stages = output / "stages"
    configs = {name: json.loads((stages / name / "stage_config.json").read_text()) for name in os.listdir(stages)}
    retrain = next(config for name, config in configs.items() if name.startswith("retrain-s1-e1-r2"))
    baseline = next(config for name, config in configs.items() if name.startswith("baseline-s1-r2"))
    assert retrain["recipe"] == baseline["recipe"]
    assert (retrain["seed"], retrain["epochs"]) == (baseline["seed"], baseline["epochs"])
    assert baseline["d_state"] == 2 and baseline["init"] == "skew_hippo"


def test_rerun_skips_finished_stages_and_new_settings_run_only_new_stages(experiment):
    output, results, _ = experiment
    messages = []
    again = reproduce("smnist", str(output), TINY, progress=False, log=messages.append)
    assert len(messages) == 16 and all(message.endswith("done before, skipped") for message in messages)
    assert again["per_rank"] == results["per_rank"]
    messages = []
    reproduce("smnist", str(output), Budget(**{**TINY.__dict__, "ranks": [1, 2, 3]}), progress=False,
              log=messages.append)
    fresh = [message for message in messages if not message.endswith("skipped")]
    assert sorted(message.split(":")[0] for message in fresh) == [
        "baseline-s0-r3", "baseline-s1-r3", "compress-s0-e2-r3", "compress-s1-e1-r3",
        "retrain-s0-e2-r3", "retrain-s1-e1-r3"]


def test_pearson_and_budgets():
    rng = np.random.default_rng(0)
    xs, ys = rng.random(8).tolist(), rng.random(8).tolist()
    assert pearson(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert pearson([1.0, 1.0], [2.0, 3.0]) is None and pearson([1.0], [1.0]) is None
    for task in ("smnist", "listops"):
        budgets = default_budgets(task)
        assert set(budgets) == {"cpu", "paper"}
        assert budgets["paper"].d_model > budgets["cpu"].d_model
    with pytest.raises(ValueError, match="ranks must lie"):
        reproduce("smnist", "unused", Budget(**{**TINY.__dict__, "ranks": [5]}))
    assert "| 1 |" in results_table({
        "task": "t", "budget": "b", "settings": {"d_state": 4, "main_epochs": 1}, "original_models": [{}],
        "pearson_original_vs_bt_retrained_all_ranks": None,
        "per_rank": [{"rank": 1, "ssm_parameters": 1, "total_parameters": 2, "bt_minus_baseline": 0.0,
                      "skew_hippo_equal_total_epochs": None,
                      **{arm: {"mean": 0.5, "std": 0.0} for arm in
                         ("original", "truncated", "bt_retrained", "skew_hippo_baseline")}}]})


def test_listops_runs_through_the_same_pipeline(tmp_path):
    budget = Budget(d_model=4, n_layers=1, d_state=4, ranks=[2], originals=[(0, 1)], main_epochs=1, batch_size=20,
                    norm="batch", prenorm=False, eval_batch_size=100,
                    data={"num_train": 40, "num_validation": 20, "num_test": 20, "min_length": 10, "max_length": 40})
    results = reproduce("listops", str(tmp_path / "listops"), budget, progress=False, log=lambda message: None)
    entry = results["per_rank"][0]
    assert entry["rank"] == 2 and 0 <= entry["bt_retrained"]["mean"] <= 1
    assert entry["pearson_original_vs_bt_retrained"] is None  # one original: undefined, not invented
    config = json.loads((tmp_path / "listops" / "models" / "bt_r2" / "config.json").read_text())
    assert config["vocab_size"] == 16 and config["pad_token_id"] == 0 and config["d_state"] == 2
