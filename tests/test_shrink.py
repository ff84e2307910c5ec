"""`model.shrink`: the smallest reduced model within a validation tolerance, checked against a
brute-force search over every budget of every method."""

import math
import random

import numpy as np
import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, shrink_search
from s4bt_hf.shrink_search import ShrinkReport, acceptance_threshold, smallest_accepted

METHODS = ("balanced_truncation", "modal_truncation", "last", "aire")


@pytest.mark.parametrize("seed", range(30))
def test_bisection_finds_the_smallest_accepted_budget_of_a_monotone_test(seed):
    generator = random.Random(seed)
    low = generator.randint(1, 5)
    high = low + generator.randint(0, 40)
    first = generator.randint(low, high + 2)  # accepted from here on (above high: never)
    calls = []

    def accepts(m):
        assert low <= m <= high and m not in calls, "evaluated outside the range or twice"
        calls.append(m)
        return m >= first

    found = smallest_accepted(accepts, low, high)
    assert found == (first if first <= high else None)
    assert calls[0] == high
    assert len(calls) <= 1 + math.ceil(math.log2(high - low + 2))


def test_bisection_of_an_empty_range_evaluates_nothing():
    assert smallest_accepted(lambda m: pytest.fail("evaluated"), 5, 4) is None


def test_thresholds_follow_the_direction_of_the_metric():
    assert acceptance_threshold("accuracy", 0.9, 0.005) == pytest.approx(0.895)
    assert acceptance_threshold("mse", 2.0, 0.1) == pytest.approx(2.2)


def _model(problem_type=None, num_labels=3, seed=0):
    torch.manual_seed(seed)
    config = S4DSSConfig(input_dim=1, num_labels=num_labels, d_model=4, n_layers=2, d_state=4,
                         problem_type=problem_type)
    return S4DSSForSequenceClassification(config).eval()


def _batches(model, seed=1, count=3, size=16, length=24, noisy_labels=0.0):
    """Inputs with the original's own predictions as labels (a fraction flipped): its accuracy is
    known, and smaller models lose some of it."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        values = torch.randn(size, length, 1, generator=generator)
        with torch.no_grad():
            labels = model(input_values=values).logits.argmax(-1)
        flip = torch.rand(size, generator=generator) < noisy_labels
        labels = torch.where(flip, (labels + 1) % model.config.num_labels, labels)
        batches.append({"input_values": values, "labels": labels})
    return batches


def _accuracy(model, batches):
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            correct += (model(input_values=batch["input_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
            total += batch["labels"].numel()
    return correct / total


def test_shrink_returns_the_smallest_model_brute_force_finds():
    model = _model()
    batches = _batches(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    max_drop = 0.05
    shrunk = model.shrink(batches, max_drop, methods=METHODS)
    report = shrunk.shrink_report
    # brute force: every budget of every method, accuracy computed here, independently
    original = _accuracy(model, batches)
    assert report.original_value == pytest.approx(original)
    accepted = {}
    for method in METHODS:
        values = {m: _accuracy(model.reduce(method, budget=4 * m), batches) for m in range(2, 9)}
        passing = [m for m, value in values.items() if value >= original - max_drop]
        monotone = passing == list(range(min(passing), 9)) if passing else True
        if monotone and passing:
            accepted[method] = min(passing)
    best = min(accepted.values())
    chosen = report.best
    assert chosen is not None and chosen.modes_per_channel == best
    assert chosen.states == 4 * best == 4 * sum(shrunk.config.layer_d_states)
    assert chosen.states_removed == pytest.approx(1 - best / 8)
    assert _accuracy(shrunk, batches) == pytest.approx(chosen.value) and chosen.accepted
    assert shrunk.compression_report.method == chosen.method
    # nothing below the chosen size passed for any method searched after it
    assert all(not c.accepted for c in report.candidates if c.modes_per_channel < best)
    assert report.evaluations == len(report.candidates) <= 4 + 3 * len(METHODS)
    # the original is untouched
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_shrink_report_round_trips_and_renders(tmp_path):
    model = _model()
    shrunk = model.shrink(_batches(model), 0.1, methods="balanced_truncation")
    report = shrunk.shrink_report
    path = tmp_path / "report.json"
    report.save(str(path))
    import json

    loaded = ShrinkReport.from_dict(json.loads(path.read_text()))
    assert loaded == report
    text = report.to_markdown()
    assert "Chosen: balanced_truncation" in text and text.count("| balanced_truncation |") == report.evaluations


def test_a_zero_tolerance_regression_accepts_only_what_does_not_grow_the_mse():
    model = _model(problem_type="regression", num_labels=1)
    generator = torch.Generator().manual_seed(3)
    batches = [{"input_values": torch.randn(8, 20, 1, generator=generator),
                "labels": torch.randn(8, generator=generator)} for _ in range(2)]
    shrunk = model.shrink(batches, 0.2, methods=["balanced_truncation"])
    report = shrunk.shrink_report
    assert report.metric == "mse" and report.threshold == pytest.approx(1.2 * report.original_value)
    for candidate in report.candidates:
        assert candidate.accepted == (candidate.value <= report.threshold)


def test_shrink_with_and_without_refit_records_both():
    model = _model()
    batches = _batches(model, noisy_labels=0.1)
    calibration = [{"input_values": torch.randn(16, 24, 1)}]
    shrunk = model.shrink(batches, 0.05, methods=["balanced_truncation"], refit=[True, False],
                          calibration_data=calibration)
    report = shrunk.shrink_report
    assert report.candidates[0].refit and report.refit == [True, False]
    # the pair without refit is searched too, unless the refit already reached the smallest budget
    assert any(not c.refit for c in report.candidates) or report.best.modes_per_channel == 2
    refit_only = model.shrink(batches, 0.05, methods=["balanced_truncation"], refit=True, calibration_data=calibration)
    assert all(c.refit for c in refit_only.shrink_report.candidates)
    assert refit_only.compression_report.layers[0].refit is not None


def test_nothing_within_the_tolerance_gives_a_copy_of_the_original(monkeypatch):
    model = _model()
    batches = _batches(model)
    monkeypatch.setattr(shrink_search, "is_accepted", lambda metric, value, threshold: False)
    shrunk = model.shrink(batches, 0.0, methods=["last"])
    assert shrunk is not model and shrunk.shrink_report.chosen is None
    assert shrunk.config.d_state == model.config.d_state
    assert getattr(shrunk, "compression_report", None) is getattr(model, "compression_report", None) is None
    assert shrunk.shrink_report.evaluations == 1  # the full budget failed: nothing smaller is tried
    assert "No reduced model" in shrunk.shrink_report.to_markdown()


def test_numpy_batches_and_a_label_column_are_accepted():
    model = _model()
    batches = [{"input_values": batch["input_values"].numpy(), "label": batch["labels"].numpy()}
               for batch in _batches(model)]
    assert model.shrink(batches, 0.1, methods="last").shrink_report.validation_samples == 48


def test_training_mode_is_restored():
    model = _model().train()
    model.shrink(_batches(model), 0.1, methods="last")
    assert model.training
    with pytest.raises(ValueError, match="does not fit the model"):  # also when the search fails
        model.shrink([{"input_values": torch.randn(2, 5, 1), "labels": torch.tensor([0, 7])}], methods="last")
    assert model.training


@pytest.mark.parametrize("arguments, message", [
    (dict(max_drop=1.5), "max_drop"),
    (dict(max_drop=True), "max_drop"),
    (dict(methods=["balanced"]), "methods"),
    (dict(refit=True), "calibration_data"),
    (dict(refit="yes"), "refit"),
    (dict(metric="auc"), "metric"),
    (dict(metric="mse"), "not a metric of this problem type"),
    (dict(rank=2), "chooses the size"),
])
def test_bad_arguments_are_named(arguments, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        model.shrink(_batches(model), **arguments)


def test_validation_data_without_labels_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="batch 0 has no `labels`"):
        model.shrink([{"input_values": np.zeros((2, 5, 1), dtype=np.float32)}])
    with pytest.raises(TypeError, match="validation_data"):
        model.shrink(torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="holds no batch"):
        model.shrink([])
