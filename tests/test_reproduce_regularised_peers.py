"""The compression-aware arms of a strong run: the Hankel-regularised originals measured with the
field's metric (states removed at <= 0.5 / 1 point, against their own original and against the
unregularised one), and `in_training_ranks`, which narrows the reduction-during-training arm."""

import os

import pytest

import s4bt_hf.experiments.field_metric as field_metric
from s4bt_hf.cli import main as cli_main
from s4bt_hf.experiments.field_metric import against_unregularised
from s4bt_hf.experiments.reproduce import Budget, CompressionAware, reproduce

TINY = Budget(d_model=4, n_layers=1, d_state=4, ranks=[1, 2], originals=[(0, 1)], main_epochs=1, batch_size=25,
              train_samples=50, eval_batch_size=250, equal_total_ranks=[])


def _curve_row(variant, states, validation, test, samples=100, total=10):
    return {"original": "regularised", "variant": variant, "refit": False, "states": states,
            "kept_fraction": states / total, "validation_accuracy": validation, "test_accuracy": test,
            "test_correct": round(test * samples)}


def test_states_removed_against_the_unregularised_original():
    """Against its own original (0.95 validation) the 2-state reduction is within 0.5 point; against
    the unregularised original of the same seed (0.97) only the 8-state one is."""
    regularised = [{"curve": [_curve_row("bt", 2, 0.948, 0.93), _curve_row("bt", 8, 0.966, 0.96)],
                    "original_validation_accuracy": 0.95, "original_test_accuracy": 0.95, "test_samples": 100}]
    plain = [{"original_validation_accuracy": 0.97, "original_test_accuracy": 0.98, "test_samples": 100}]
    entries = {entry["drop"]: entry for entry in against_unregularised(regularised, plain)}
    assert entries[0.005]["states"] == 8 and entries[0.005]["states_removed"] == pytest.approx(0.2)
    assert entries[0.005]["test_samples_lost"] == 2 and entries[0.005]["test_points_lost"] == pytest.approx(2.0)
    assert entries[0.01]["states"] == 8  # 2 states lose 2.2 points of validation
    with pytest.raises(ValueError):  # one unregularised original per regularised one
        against_unregularised(regularised, plain * 2)


@pytest.mark.parametrize("ranks", [(0,), (2, True)])
def test_bad_in_training_ranks(ranks):
    with pytest.raises(ValueError, match="in_training_ranks"):
        CompressionAware(in_training_ranks=ranks)


def test_in_training_ranks_must_be_among_the_budgets_ranks(tmp_path):
    with pytest.raises(ValueError, match=r"in_training_ranks \[3\] must be among the ranks \[1, 2\]"):
        reproduce("smnist", str(tmp_path / "run"), TINY, progress=False, log=lambda _: None,
                  compression_aware=CompressionAware(in_training_ranks=(3,)))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_in_training_ranks_option_needs_compression_aware(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reproduce", "--output", str(tmp_path / "run"), "--in-training-ranks", "8"])
    assert exit_info.value.code == 2
    assert "--in-training-ranks" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_regularised_originals_get_the_fields_metric(tmp_path, monkeypatch):
    """With `peer_comparison`, each Hankel-regularised original gets its own peer stage; the drops are
    reported against it and against the unregularised original; no in-training arm when
    `in_training_ranks` is empty; a re-run skips every stage."""
    # one method and one budget keep the test short; every method and budget runs the same code
    (balanced,) = [variant for variant in field_metric.DEFAULT_VARIANTS if variant[0] == "balanced_truncation"]
    monkeypatch.setattr(field_metric, "DEFAULT_VARIANTS", (balanced,))
    monkeypatch.setattr(field_metric, "REGULARISED_VARIANTS", (balanced,))
    monkeypatch.setattr(field_metric, "DEFAULT_KEPT_FRACTIONS", (0.5,))
    budget = Budget(**{**TINY.__dict__, "ranks": [2], "peer_comparison": True})
    settings = CompressionAware(hankel_weights=(1e-3,), hankel_every=1, in_training_ranks=())
    output = tmp_path / "run"
    results = reproduce("smnist", str(output), budget, progress=False, log=lambda _: None,
                        compression_aware=settings)
    aware = results["compression_aware"]
    assert aware["in_training_runs"] == [] and results["per_rank"][0]["reduced_during_training"] is None
    names = {name.rsplit("-", 1)[0] for name in os.listdir(output / "stages")}
    assert "hankel-peers-s0-e1-w0.001" in names and not any(name.startswith("reduce-during") for name in names)
    peers = aware["peers"]
    assert peers["hankel_weight"] == 1e-3
    assert {(row["variant"], row["refit"], row["states"]) for row in peers["curves"]} == {
        ("balanced_truncation", False, 8), ("balanced_truncation", True, 8)}
    # every curve row is measured against the regularised original; the second summary re-reads the
    # same rows against the unregularised original measured by the plain peer stage
    (regularised_original,) = {row["original_validation_accuracy"] for row in peers["curves"]}
    plain_original = results["peers"]["curves"][0]["original_validation_accuracy"]
    for entry in peers["states_removed_vs_unregularised"]:
        if entry["states"] is not None:
            chosen = next(row for row in peers["curves"] if (row["variant"], row["refit"], row["states"]) ==
                          (entry["variant"], entry["refit"], entry["states"]))
            assert plain_original - chosen["validation_accuracy"] <= entry["drop"] + 1e-12
    assert len(peers["summary"]) == len(peers["summary_vs_unregularised"]) == 2 * 2  # refit × drops
    assert 0 <= regularised_original <= 1
    table = (output / "results.md").read_text()
    assert "Hankel-regularised originals (λ = 0.001), the drop against each regularised original" in table
    assert "against the UNREGULARISED original" in table
    assert (output / "states_vs_accuracy_hankel.png").stat().st_size > 0
    again = []
    reproduce("smnist", str(output), budget, progress=False, log=again.append, compression_aware=settings)
    assert all(message.endswith("skipped") for message in again if not message.startswith("hankel weight chosen"))
