"""`model.reduce(method=...)` on whole models: every method, uni- and bidirectional; the DC gain
that singular perturbation keeps, checked on the layer's own convolution; the data-aware refit
against the layer run directly on the captured inputs; rank budgets; bad input; reports."""

import json
import math

import pytest
import torch

from s4bt_hf import CompressionReport, S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.compression_report import LayerCompression
from s4bt_hf.experiments.compare_reductions import compare_reductions, originals_of_reproduce
from s4bt_hf.reduction_methods import REDUCTION_METHODS


def _build(bidirectional=False, dtype=torch.float64, norm="layer", d_state=8, seed=0):
    torch.manual_seed(seed)
    config = S4DSSConfig(input_dim=2, num_labels=3, d_model=6, n_layers=2, d_state=d_state,
                         bidirectional=bidirectional, norm=norm)
    model = S4DSSForSequenceClassification(config).to(dtype)
    with torch.no_grad():  # Δ large enough that every kernel has decayed within 3000 steps
        for layer in model.s4dss.layers:
            layer.kernel.log_dt.uniform_(-1.5, -0.5)
    return model.eval()


def _snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def _dc_gains(kernel, length=3000):
    """Σ_k K_k + D per channel, from the layer's own kernel (both rows of a bidirectional layer)."""
    with torch.no_grad():
        return kernel.convolution_kernel(length).sum((0, 2)) + kernel.D


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("method", sorted(REDUCTION_METHODS))
def test_every_method_returns_a_new_smaller_model(method, bidirectional):
    model = _build(bidirectional)
    before = _snapshot(model)
    reduced = model.reduce(method, rank=3)
    _assert_unchanged(before, model)
    assert model.config.d_state == 8 and reduced.config.d_state == 3
    report = reduced.compression_report
    assert report.method == method and report.wall_seconds >= 0
    assert report.ssm_parameters_after < report.ssm_parameters_before
    inputs = torch.randn(2, 30, 2, dtype=torch.float64)
    assert torch.isfinite(reduced(input_values=inputs).logits).all()
    for layer in report.layers:
        assert len(layer.kernel_error) == len(layer.dc_gain_error) == 6
        assert all(math.isfinite(value) for value in layer.kernel_error)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("method, options", [("singular_perturbation", {}), ("modal_truncation", {"match_dc": True})])
def test_dc_gain_kept_on_the_layers_own_kernel(method, options, bidirectional):
    model = _build(bidirectional)
    for rank in (1, 3):
        reduced = model.reduce(method, rank=rank, **options)
        for original, new in zip(model.s4dss.layers, reduced.s4dss.layers, strict=True):
            torch.testing.assert_close(_dc_gains(new.kernel), _dc_gains(original.kernel), rtol=1e-8, atol=1e-9)
        assert max(max(layer.dc_gain_error) for layer in reduced.compression_report.layers) < 1e-8
    # balanced truncation does not keep it (the test would catch a method that ignores its direct term)
    truncated = model.reduce("balanced_truncation", rank=1)
    assert not torch.allclose(_dc_gains(truncated.s4dss.layers[0].kernel), _dc_gains(model.s4dss.layers[0].kernel))


def test_modal_truncation_keeps_the_original_parameters_of_kept_modes():
    model = _build()
    reduced = model.reduce("modal_truncation", rank=3)
    for original, new in zip(model.s4dss.layers, reduced.s4dss.layers, strict=True):
        old_modes = original.kernel.modes(torch.float64)
        for channel in range(6):
            for mode in range(3):
                value = new.kernel.modes(torch.float64)[channel, mode]
                matches = (old_modes[channel] == value).nonzero()
                assert len(matches) == 1
                index = matches[0, 0]
                assert torch.equal(new.kernel.B[channel, mode], original.kernel.B[channel, index])
                assert torch.equal(new.kernel.C[:, channel, mode], original.kernel.C[:, channel, index])


def test_h2_kernel_error_is_never_above_balanced_truncation():
    model = _build(d_state=10)
    truncated = model.reduce("balanced_truncation", rank=2, kernel_length=3000)
    optimal = model.reduce("h2", rank=2, kernel_length=3000, max_iterations=20)
    for bt_layer, h2_layer in zip(truncated.compression_report.layers, optimal.compression_report.layers, strict=True):
        for bt_error, h2_error in zip(bt_layer.kernel_error, h2_layer.kernel_error, strict=True):
            assert h2_error <= bt_error * (1 + 1e-6) + 1e-9
        assert h2_layer.details["channels_kept_balanced"] <= 6
        assert len(h2_layer.details["h2_error"]) == 6


def _captured_layer_io(model, batches):
    captured = {index: [] for index in range(len(model.s4dss.layers))}
    handles = [layer.kernel.register_forward_hook(
        lambda module, args, output, index=index: captured[index].append((args[0].clone(), output.clone())))
        for index, layer in enumerate(model.s4dss.layers)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("bidirectional", [False, True])
def test_refit_lowers_the_output_error_measured_on_the_layer_itself(bidirectional):
    model = _build(bidirectional, norm="batch")
    model.train()  # batch norm in training mode: the refit must not touch its running statistics
    generator = torch.Generator().manual_seed(3)
    batches = [{"input_values": torch.randn(4, 40, 2, generator=generator, dtype=torch.float64),
                "attention_mask": torch.ones(4, 40, dtype=torch.long)} for _ in range(3)]
    batches[1]["attention_mask"][:, 30:] = 0
    before = _snapshot(model)
    reduced = model.reduce("balanced_truncation", rank=2, calibration_data=batches)
    _assert_unchanged(before, model)
    assert model.training and reduced.training
    plain = model.reduce("balanced_truncation", rank=2)
    model.eval()
    captured = _captured_layer_io(model, batches)
    for index, layer_report in enumerate(reduced.compression_report.layers):
        errors = {}
        for name, candidate in (("after", reduced), ("before", plain)):
            squared, energy = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
            for batch, (inputs, outputs) in zip(batches, captured[index], strict=True):
                valid = batch["attention_mask"].bool()
                with torch.no_grad():
                    predicted = candidate.s4dss.layers[index].kernel(torch.where(valid[..., None], inputs, 0.0))
                squared += ((predicted - outputs).square() * valid[..., None]).sum((0, 1))
                energy += (outputs.square() * valid[..., None]).sum((0, 1))
            errors[name] = (squared / energy).sqrt()
        torch.testing.assert_close(errors["after"], torch.tensor(layer_report.refit["error_after"],
                                                                 dtype=torch.float64), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(errors["before"], torch.tensor(layer_report.refit["error_before"],
                                                                  dtype=torch.float64), rtol=1e-5, atol=1e-7)
        assert torch.all(errors["after"] <= errors["before"] + 1e-12)
        assert errors["after"].mean() < errors["before"].mean()


def test_budget_splits_modes_between_layers():
    model = _build(d_state=8)
    reduced = model.reduce("balanced_truncation", budget=6 * 2 * 5)  # 5 modes per channel on average
    ranks = reduced.compression_report.budget["ranks"]
    assert sum(ranks) <= 10 and reduced.config.d_state in (ranks, ranks[0])
    assert [layer.rank for layer in reduced.compression_report.layers] == ranks
    fraction = model.reduce("modal_truncation", budget=0.5)
    assert fraction.compression_report.ssm_parameters_after <= 0.5 * fraction.compression_report.ssm_parameters_before


BAD_REDUCTIONS = [
    ({"method": "pruning", "rank": 2}, ValueError, r"`method` must be one of"),
    ({"method": "balanced_truncation", "rank": 2, "match_dc": True}, TypeError, r"does not take option\(s\) match_dc"),
    ({"method": "h2", "rank": 2, "max_iterations": -1}, ValueError, r"max_iterations"),
    ({"method": "h2", "rank": 2, "budget": 20}, ValueError, r"exactly one of"),
    ({"method": "modal_truncation", "budget": 11}, ValueError, r"one mode per channel per layer"),
    ({"method": "modal_truncation", "budget": 1000}, ValueError, r"and the model's 96"),
    ({"method": "modal_truncation", "budget": 0.01}, ValueError, r"less than one mode per channel"),
    ({"method": "modal_truncation", "budget": 1.5}, ValueError, r"fraction of SSM parameters"),
    ({"method": "modal_truncation", "budget": True}, TypeError, r"`budget` must be"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": "batches"}, TypeError, r"`calibration_data`"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": []}, ValueError, r"holds no batch"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": {"input_ids": torch.zeros(2, 5, dtype=torch.long)}},
     ValueError, r"`calibration_data` batch 0 does not fit the model"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": {"input_values": torch.zeros(2, 5, 3)}},
     ValueError, r"`calibration_data` batch 0 does not fit"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": {"pixels": torch.zeros(2, 5, 2)}},
     ValueError, r"key\(s\) \['pixels'\]"),
    ({"method": "modal_truncation", "rank": 2, "calibration_data": [{"input_values": [[1.0, 2.0]]}]},
     TypeError, r"must be a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_REDUCTIONS, ids=[str(i) for i in range(len(BAD_REDUCTIONS))])
def test_bad_reductions_raise_and_leave_the_model_untouched(kwargs, error, message):
    model = _build()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        model.reduce(**kwargs)
    _assert_unchanged(before, model)


def test_report_round_trip_and_legacy_reports(tmp_path):
    model = _build()
    reduced = model.reduce("h2", rank=2, max_iterations=5)
    reduced.save_pretrained(tmp_path / "h2")
    loaded = S4DSSForSequenceClassification.from_pretrained(tmp_path / "h2")
    assert loaded.compression_report.to_dict() == reduced.compression_report.to_dict()
    assert loaded.compression_report.options == {"max_iterations": 5}
    assert "H2" in (tmp_path / "h2" / "README.md").read_text() or "h2" in (tmp_path / "h2" / "README.md").read_text()
    # a report written before reports had a per-method part
    legacy = reduced.compression_report.to_dict()
    for layer in legacy["layers"]:
        layer.pop("details"), layer.pop("refit"), layer.pop("dc_gain_error")
        layer.update(hankel_singular_values=[[1.0, 0.5]], kept_states=[2], kept_energy=[1.0], error_bound=[0.0],
                     max_cholesky_shift=0.0, max_eigenvector_condition=1.0)
    for key in ("options", "budget", "wall_seconds"):
        legacy.pop(key)
    restored = CompressionReport.from_dict(json.loads(json.dumps(legacy)))
    assert restored.layers[0].hankel_singular_values == [[1.0, 0.5]] and restored.layers[0].kept_states == [2]
    assert restored.layers[0].layer_kept_energy == 1.0
    assert "kept Hankel energy" in restored.summary_markdown()
    assert LayerCompression.from_dict(legacy["layers"][0]).error_bound == [0.0]


def test_compare_reductions_writes_its_table(tmp_path):
    torch.manual_seed(0)
    config = S4DSSConfig(vocab_size=18, pad_token_id=0, num_labels=10, d_model=4, n_layers=1, d_state=4)
    model = S4DSSForSequenceClassification(config)
    model.save_pretrained(tmp_path / "model")
    data = {"num_train": 30, "num_validation": 10, "num_test": 10, "min_length": 10, "max_length": 40}
    original = {"name": "tiny", "model": str(tmp_path / "model"), "task": "listops", "data": data,
                "train_samples": None}
    variants = (("balanced_truncation", "balanced_truncation", {}), ("modal+dc", "modal_truncation",
                                                                        {"match_dc": True}))
    results = compare_reductions([original], [1, 2], str(tmp_path / "out"), variants=variants,
                                 settings=("uniform", "uniform+refit"), calibration_samples=8, batch_size=8,
                                 log=lambda message: None)
    assert len(results["rows"]) == 2 * 2 * 2
    assert all(0 <= row["test_accuracy"] <= 1 for row in results["rows"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "modal+dc" in table and "uniform+refit" in table
    assert (tmp_path / "out" / "keep_ratio.png").stat().st_size > 0
    with pytest.raises(ValueError, match="already holds results.json"):
        compare_reductions([original], [1], str(tmp_path / "out"), variants=variants)


def _fake_stage(folder, name, config):
    stage = folder / "stages" / name
    stage.mkdir(parents=True)
    (stage / "stage_config.json").write_text(json.dumps({"task": "smnist", "data": {}, "train_samples": None,
                                                         **config}))
    (stage / "result.json").write_text(json.dumps({"model": str(stage / "run" / "best")}))


def test_originals_of_reproduce_picks_the_chosen_regularised_originals(tmp_path):
    _fake_stage(tmp_path, "pretrain-s0-e3-aaaa", {"seed": 0})
    for weight, every, digest in ((0.001, 4, "bbbb"), (0.01, 4, "cccc"), (0.001, 1, "dddd")):
        _fake_stage(tmp_path, f"hankel-pretrain-s0-e3-w{weight:g}-{digest}",
                    {"seed": 0, "hankel_weight": weight, "hankel_every": every})
    assert [original["name"] for original in originals_of_reproduce(str(tmp_path))] == ["pretrain-s0-e3"]
    with pytest.raises(ValueError, match="no compression-aware results"):
        originals_of_reproduce(str(tmp_path), regularised=True)
    arm = {"settings": {"hankel_every": 4}, "hankel_selection": {"chosen_weight": 0.01}}
    (tmp_path / "results.json").write_text(json.dumps({"compression_aware": arm}))
    chosen = originals_of_reproduce(str(tmp_path), regularised=True)
    expected = tmp_path / "stages" / "hankel-pretrain-s0-e3-w0.01-cccc" / "run" / "best"
    assert [original["model"] for original in chosen] == [str(expected)]
    arm["settings"]["hankel_reuse"] = True  # no stage was trained with it
    (tmp_path / "results.json").write_text(json.dumps({"compression_aware": arm}))
    with pytest.raises(ValueError, match="chosen hankel_weight 0.01, hankel_every 4 and hankel_reuse True"):
        originals_of_reproduce(str(tmp_path), regularised=True)
    _fake_stage(tmp_path, "hankel-pretrain-s0-e3-w0.01-eeee",
                {"seed": 0, "hankel_weight": 0.01, "hankel_every": 4, "hankel_reuse": True})
    assert [original["name"] for original in originals_of_reproduce(str(tmp_path), regularised=True)] == [
        "hankel-pretrain-s0-e3-w0.01"]
    assert "eeee" in originals_of_reproduce(str(tmp_path), regularised=True)[0]["model"]
