"""The shrunk-model speed benchmark still runs (`bench/bench_shrunk_speed.py` on a tiny token model,
a budget reduction and a saved reduced model, without the slow ONNX export) and reports every part
of its JSON line. Nothing here is timed: no measured time is compared."""

import json

from bench_runner import run_bench

from s4bt_hf import S4DSSForSequenceClassification


def test_speed_benchmark_reports_every_model_against_the_original(tmp_path, token_config):
    torch_seeded = S4DSSForSequenceClassification(token_config()).eval()  # 2 layers x 8 channels x 4 modes
    original, shrunk = tmp_path / "original", tmp_path / "rank1"
    torch_seeded.save_pretrained(original)
    torch_seeded.reduce("balanced_truncation", rank=1).save_pretrained(shrunk)
    accuracy = tmp_path / "accuracy.json"
    accuracy.write_text(json.dumps({"original": 0.9, str(shrunk): 0.7}))
    report = run_bench("bench_shrunk_speed.py", "--model", str(original), "--shrunk", str(shrunk), "--budgets", "0.5",
                       "--accuracy-json", str(accuracy), "--length", "16", "--steps", "12", "--batch", "2",
                       "--repeats", "1", "--no-onnx")
    assert report["threads"] == 1 and report["onnx"] is False and report["original"]["input"] == "input_ids"
    models = report["models"]
    assert list(models) == ["original", "bt_0.5", str(shrunk)]
    timings = {"whole_sequence", "streaming_step_batch_1", "streaming_step_batch"}
    for label, row in models.items():
        assert set(row["ms"]) == set(row["speedup"]) == timings, label
        assert all(value > 0 for value in [*row["ms"].values(), *row["speedup"].values()]), label
        assert row["ssm_parameters"] > 0 and row["parameters"] > row["ssm_parameters"], label
    assert all(value == 1.0 for value in models["original"]["speedup"].values())
    # the states kept: 2 layers x 8 channels x 4 modes, half of them, one mode per channel
    assert [models[label]["ssm_modes"] for label in models] == [64, 32, 16]
    assert models[str(shrunk)]["ssm_modes_fraction"] == 0.25 and models[str(shrunk)]["d_state"] == [1, 1]
    assert models["original"]["ssm_parameters"] > models["bt_0.5"]["ssm_parameters"]
    assert [models[label]["accuracy"] for label in models] == [0.9, None, 0.7]
