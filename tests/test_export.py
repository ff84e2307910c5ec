"""Export of the streaming step (ONNX through onnxruntime, torch.export .pt2, int8) and its refusals."""

import json
import os
import sys

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel
from s4bt_hf.cli import main as cli_main
from s4bt_hf.export import ExportDependencyError, export_model, load_exported

onnx = pytest.importorskip("onnx")


def classifier(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(input_dim=2, d_model=8, n_layers=2, d_state=[6, 4], norm="batch", num_labels=3,
                  dt_min=0.001, dt_max=0.01)  # slow modes: the state matters over 1,000 steps
    fields.update(overrides)
    model = S4DSSForSequenceClassification(S4DSSConfig(**fields))
    model.train()
    with torch.no_grad():
        model(input_values=torch.randn(4, 30, 2))  # BatchNorm statistics that are not the identity
    return model.eval()


def eager_stream(model, key, inputs):
    """(L, B, ...) inputs -> (L, B, ...) outputs of `streaming_step`."""
    state = model.init_streaming_state(inputs.shape[1])
    outputs = []
    with torch.no_grad():
        for position in inputs:
            output, state = model.streaming_step(state, **{key: position})
            outputs.append(output)
    return torch.stack(outputs)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    model = classifier()
    folder = tmp_path_factory.mktemp("export") / "onnx"
    description = export_model(model, folder, format="onnx", int8=True)
    return model, folder, description


def test_onnx_export_equals_eager_streaming_over_1000_steps(onnx_export):
    model, folder, description = onnx_export
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "export.json", "model.int8.onnx", "model.onnx"]
    assert json.loads((folder / "export.json").read_text()) == description
    assert [entry["name"] for entry in description["inputs"]] == [
        "inputs", "ssm_state_0", "ssm_state_1", "pooled_sum", "pooled_count"]
    assert description["inputs"][1]["shape"] == ["batch", 8, 6, 2]
    assert description["state_bytes_per_sequence"] == 4 * (8 * 6 * 2 + 8 * 4 * 2 + 8 + 1)
    graph = onnx.load(str(folder / "model.onnx"))
    assert all(tensor.data_type != onnx.TensorProto.COMPLEX64 for tensor in graph.graph.initializer)
    inputs = torch.randn(1000, 2, 2, generator=torch.Generator().manual_seed(5))
    runner = load_exported(folder)
    exported = runner.run(inputs)
    torch.testing.assert_close(exported, eager_stream(model, "input_values", inputs), rtol=1e-5, atol=1e-5)
    assert "Exported streaming step" in (folder / "README.md").read_text()


def test_int8_graph_quantises_only_the_linear_layers(onnx_export):
    model, folder, description = onnx_export
    ops = [node.op_type for node in onnx.load(str(folder / "model.int8.onnx")).graph.node]
    assert "MatMulInteger" in ops and "Gemm" not in ops and "MatMul" not in ops
    assert "Mul" in ops  # the recurrence's float multiplications are still there
    inputs = torch.randn(200, 2, 2, generator=torch.Generator().manual_seed(6))
    expected = eager_stream(model, "input_values", inputs)
    error = (load_exported(folder, int8=True).run(inputs) - expected).abs().max()
    assert 0 < error < 0.05 * expected.abs().max()  # quantised (not identical), yet close
    assert description["check"]["int8_max_abs_error"] > 0


def test_torch_export_of_a_compressed_token_backbone_reloads_and_equals_eager(tmp_path):
    torch.manual_seed(1)
    model = S4DSSModel(S4DSSConfig(vocab_size=11, d_model=6, n_layers=2, d_state=6)).eval()
    small = model.balanced_truncate(rank=2).eval()
    (tmp_path / "pt2").mkdir()  # an empty folder is fine: nothing to overwrite
    description = export_model(small, tmp_path / "pt2", format="torch")
    assert description["model"]["compressed"] and description["model"]["d_state"] == [2, 2]
    tokens = torch.randint(0, 11, (300, 3), generator=torch.Generator().manual_seed(2))
    runner = load_exported(tmp_path / "pt2", trust_pickle=True)
    torch.testing.assert_close(runner.run(tokens), eager_stream(small, "input_ids", tokens), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_compressed_classifier(tmp_path):
    small = classifier(seed=2).balanced_truncate(rank=3).eval()
    export_model(small, tmp_path / "small", format="onnx")
    inputs = torch.randn(300, 1, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_exported(tmp_path / "small").run(inputs),
                               eager_stream(small, "input_values", inputs), rtol=1e-5, atol=1e-5)


def test_cli_export_and_its_refusals(tmp_path, capsys):
    model = classifier(seed=3)
    model.save_pretrained(tmp_path / "saved")
    assert cli_main(["export", "--model", str(tmp_path / "saved"), "--output", str(tmp_path / "out"),
                     "--format", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["graph"] == "model.pt2"
    assert (tmp_path / "out" / "model.pt2").is_file()
    before = (tmp_path / "out" / "export.json").read_bytes()
    with pytest.raises(SystemExit) as refused:
        cli_main(["export", "--model", str(tmp_path / "saved"), "--output", str(tmp_path / "out")])
    assert refused.value.code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "export.json").read_bytes() == before
    with pytest.raises(SystemExit) as refused:
        cli_main(["export", "--model", str(tmp_path / "saved"), "--output", str(tmp_path / "x"), "--format", "tflite"])
    assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err
    classifier(bidirectional=True).save_pretrained(tmp_path / "bidirectional")
    with pytest.raises(SystemExit) as refused:
        cli_main(["export", "--model", str(tmp_path / "bidirectional"), "--output", str(tmp_path / "y")])
    assert refused.value.code == 2 and "bidirectional" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_bad_export_arguments_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    model = classifier()
    with pytest.raises(ValueError, match="format"):
        export_model(model, tmp_path / "a", format="tflite")
    with pytest.raises(ValueError, match="int8"):
        export_model(model, tmp_path / "a", format="torch", int8=True)
    with pytest.raises(TypeError, match="model"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="eval"):
        export_model(classifier().train(), tmp_path / "a")
    with pytest.raises(ValueError, match="bidirectional"):
        export_model(classifier(bidirectional=True), tmp_path / "a")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="taken"):
        export_model(model, tmp_path / "taken", format="torch")
    assert os.listdir(tmp_path / "taken") == ["mine.txt"] and (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ExportDependencyError, match=r"s4bt-hf\[export\]"):
        export_model(model, tmp_path / "a", format="onnx")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import s4bt_hf.export.exporter as export_module

    def broken_check(*args):
        raise RuntimeError("simulated failure after the graph was written")

    monkeypatch.setattr(export_module, "_check_against_eager", broken_check)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(classifier(), tmp_path / "out", format="torch")
    assert os.listdir(tmp_path) == []


def test_exported_step_checks_inputs_against_the_description(onnx_export):
    _, folder, _ = onnx_export
    runner = load_exported(folder)
    state = runner.initial_state(2)
    with pytest.raises(ValueError, match=r"`ssm_state_1` must be float32 of shape \('batch', 8, 4, 2\).*export.json"):
        runner.step(torch.zeros(2, 2), [state[0], state[1][:, :, :3], *state[2:]])
    with pytest.raises(ValueError, match="`pooled_sum`.*batch 2"):
        runner.step(torch.zeros(2, 2), [*state[:2], state[2][:1], state[3]])
    with pytest.raises(ValueError, match="`inputs` must be float32"):
        runner.step(torch.zeros(2, 2, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="takes 5 tensors"):
        runner.step(torch.zeros(2, 2), state[:2])
    export_model(classifier(), folder.parent / "z", format="torch")
    with pytest.raises(ValueError, match="int8"):
        load_exported(folder.parent / "z", int8=True)


def test_executorch_export_equals_eager_streaming(tmp_path):
    pytest.importorskip("executorch", reason="the [executorch] extra is not installed (make test leaves it out)")
    model = classifier(seed=4)
    description = export_model(model, tmp_path / "pte", format="executorch")
    assert description["inputs"][1]["shape"] == [1, 8, 6, 2]  # static batch 1
    inputs = torch.randn(300, 1, 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(load_exported(tmp_path / "pte").run(inputs),
                               eager_stream(model, "input_values", inputs), rtol=1e-5, atol=1e-5)


def test_executorch_missing_names_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(ExportDependencyError, match=r"s4bt-hf\[executorch\]"):
        export_model(classifier(), tmp_path / "a", format="executorch")
    assert os.listdir(tmp_path) == []
