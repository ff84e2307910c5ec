"""A long `s4bt reproduce` run split between machines or sessions: `--seeds` runs some originals
with their stages, the parts' `stages/` folders copied into one run folder make the whole run,
which then trains nothing; `--shrink-drops` sets or removes the shrink stages, `--no-peers` the
peers stages."""

import shutil
from dataclasses import replace

import pytest
from test_reproduce import TINY, stage_folders

from s4bt_hf.cli import main as cli_main
from s4bt_hf.experiments.reproduce import default_budgets, reproduce, with_seeds


def test_with_seeds_keeps_the_originals_of_those_seeds():
    assert with_seeds(TINY, [1]).originals == [(1, 1)]
    assert with_seeds(TINY, [1, 0]).originals == TINY.originals  # the budget's order
    assert with_seeds(TINY, None) is TINY and TINY.originals == [(0, 2), (1, 1)]  # the budget is not changed
    for seeds in ([2], []):
        with pytest.raises(ValueError, match=r"the budget's originals have seeds 0, 1"):
            with_seeds(TINY, seeds)


def test_parts_run_on_two_machines_make_the_whole_run(tmp_path):
    first, second = tmp_path / "machine-a" / "run", tmp_path / "machine-b" / "run"
    reproduce("smnist", str(first), with_seeds(TINY, [0]), progress=False, log=lambda _: None)
    part = reproduce("smnist", str(second), with_seeds(TINY, [1]), progress=False, log=lambda _: None)
    assert [row["seed"] for row in part["runs"]] == [1, 1]
    shutil.copytree(second / "stages", first / "stages", dirs_exist_ok=True)
    shutil.rmtree(second)  # the copied results must not point back to where they were made
    messages = []
    whole = reproduce("smnist", str(first), TINY, progress=False, log=messages.append)
    assert len(messages) == 16 and all(message.endswith("done before, skipped") for message in messages)
    assert [entry["n"] for entry in (row["bt_retrained"] for row in whole["per_rank"])] == [2, 2]
    assert [row["seed"] for row in whole["original_models"]] == [0, 1]
    assert (first / "models" / "bt_r2" / "model.safetensors").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--seeds", "7"], "seeds [7]: the budget's originals have seeds 0, 1, 2"),
    (["--seeds", "1", "--compression-aware"], "include seed 0 in --seeds"),
    (["--budget", "strong", "--shrink-drops", "100"], "a drop of 100 points or more"),
])
def test_bad_split_options_are_named_before_anything_is_written(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reproduce", "--output", str(tmp_path / "run"), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_shrink_drops_and_no_peers_options_set_the_budget(tmp_path, monkeypatch):
    import s4bt_hf.experiments.reproduce as reproduce_module

    seen = {}

    def fake_reproduce(task, output, budget, **_):
        seen.update(drops=budget.shrink_drops, originals=budget.originals, peers=budget.peer_comparison)
        raise ValueError("stopped before training")

    monkeypatch.setattr(reproduce_module, "reproduce", fake_reproduce)
    cases = ((["--shrink-drops", "0.5", "2"], [0.005, 0.02], True), (["--shrink-drops"], [], True),
             ([], [0.005, 0.01], True), (["--no-peers", "--shrink-drops"], [], False))
    for arguments, drops, peers in cases:
        with pytest.raises(SystemExit):
            cli_main(["reproduce", "--budget", "strong", "--seeds", "2", "--output", str(tmp_path / "run"), *arguments])
        assert seen == {"drops": drops, "originals": [(2, 15)], "peers": peers}


def test_a_part_without_peers_or_shrink_has_the_whole_runs_stage_keys(monkeypatch):
    whole = stage_folders(monkeypatch, "smnist", "strong")
    strong = default_budgets("smnist")["strong"]
    part = stage_folders(monkeypatch, "smnist", replace(with_seeds(strong, [0]), peer_comparison=False,
                                                        shrink_drops=[]))
    assert not any(name.startswith(("peers-", "shrink-")) for name in part)
    assert "pretrain-s0-e15-8fd6b614008b" in part and set(part) < set(whole)
    assert len(part) == 1 + 2 * 4 + 4 + 3  # the original; compress, retrain, baseline at 4 ranks; equal-total at 3
