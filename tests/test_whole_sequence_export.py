"""Whole-sequence export (`export_model(..., whole_sequence=True)`): the real-arithmetic module
against the eager forward, the ONNX graph in onnxruntime and the `torch.export` program at dynamic
lengths up to 16384, export.json and its schema, and the refusals."""

import json
import os

import numpy as np
import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel
from s4bt_hf.cli import main as cli_main
from s4bt_hf.export import (
    ExportedStreamingModel,
    ExportedWholeSequenceModel,
    ExportFolderError,
    export_model,
    load_exported,
)
from s4bt_hf.export.description import validate_description
from s4bt_hf.export.whole_sequence import FOLD_LIMIT, WholeSequenceModule, diagonal_scan, real_causal_convolution

onnx = pytest.importorskip("onnx")


LENGTHS = (16, 784, 4096, 16384)
RELATIVE = 1e-4


def build(cls, seed=0, **fields):
    """A tiny trained-looking model: BatchNorm statistics that are not the identity, slow and fast modes."""
    torch.manual_seed(seed)
    model = cls(S4DSSConfig(**fields))
    if fields.get("norm") == "batch":
        model.train()
        with torch.no_grad():
            key = "input_ids" if "vocab_size" in fields else "input_values"
            model(**{key: example_inputs(model, 4, 30, torch.Generator().manual_seed(seed))})
    return model.eval()


def value_classifier(**overrides):
    fields = dict(input_dim=2, d_model=8, n_layers=2, d_state=[6, 4], norm="batch", num_labels=3,
                  dt_min=0.001, dt_max=0.1)
    return build(S4DSSForSequenceClassification, **{**fields, **overrides})


def token_backbone(**overrides):
    fields = dict(vocab_size=20, d_model=4, n_layers=2, d_state=8, bidirectional=True, prenorm=True,
                  dt_min=0.0001, dt_max=0.1)
    return build(S4DSSModel, **{**fields, **overrides})


def example_inputs(model, batch, length, generator):
    config = model.config
    if config.uses_tokens:
        return torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    return torch.randn(batch, length, config.input_dim, generator=generator)


def padded_mask(batch, length):
    """Row 0 all valid, row 1 padded over its last third, row 2 (if any) over its first half (left padding)."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:
        mask[1, length - length // 3:] = 0
    if batch > 2 and length > 1:
        mask[2, : length // 2] = 0
    return mask


def eager(model, inputs, mask):
    key = "input_ids" if model.config.uses_tokens else "input_values"
    with torch.no_grad():
        outputs = model(**{key: inputs}, attention_mask=mask)
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def assert_matches_eager(output, expected, mask):
    """|output - eager| <= RELATIVE · max |eager|, at the valid positions of a backbone's output."""
    output = torch.as_tensor(output)
    if expected.dim() == 3:
        output, expected = output[mask.bool()], expected[mask.bool()]
    error = float((output - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= RELATIVE * scale, f"relative error {error / scale:.3g}"


# ------------------------------------------------------------------ the real-arithmetic math
def test_causal_convolution_equals_a_float64_dense_convolution():
    generator = torch.Generator().manual_seed(1)
    channels, modes, length = 3, 5, 300
    log_a = torch.complex(-torch.rand(channels, modes, generator=generator, dtype=torch.float64) * 0.2,
                          torch.randn(channels, modes, generator=generator, dtype=torch.float64))
    weights = torch.randn(channels, modes, generator=generator, dtype=torch.complex128)
    inputs = torch.randn(2, length, channels, generator=generator, dtype=torch.float64)
    # oracle: K_k = Re Σ_n W_n ā_n^k by complex exp, then the dense causal sum y_t = Σ_{j<=t} K_{t-j} u_j
    steps = torch.arange(length, dtype=torch.float64)
    kernel = (weights.unsqueeze(-1) * torch.exp(log_a.unsqueeze(-1) * steps)).sum(1).real  # (H, L)
    lag = steps.unsqueeze(1) - steps.unsqueeze(0)  # [t, j]
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0).long()], torch.zeros((), dtype=torch.float64))
    expected = torch.einsum("htj,bjh->bth", toeplitz, inputs)
    for chunk in (1, 4, 32, 512):  # chunks shorter than, dividing, and longer than the sequence
        output = real_causal_convolution(inputs, log_a.real, log_a.imag, weights.real, weights.imag, chunk)
        torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_diagonal_scan_equals_the_sequential_recurrence(levels):
    generator = torch.Generator().manual_seed(2)
    log_a = torch.complex(-torch.rand(4, generator=generator, dtype=torch.float64) * 0.3,
                          torch.randn(4, generator=generator, dtype=torch.float64))
    inputs = torch.randn(4, 2, 75, generator=generator, dtype=torch.complex128)
    state, expected = torch.zeros(4, 2, dtype=torch.complex128), []
    for step in range(inputs.shape[-1]):  # s_m = ā s_{m-1} + x_m
        state = torch.exp(log_a).unsqueeze(-1) * state + inputs[..., step]
        expected.append(state)
    expected = torch.stack(expected, dim=-1)
    real, imag = diagonal_scan(inputs.real, inputs.imag, log_a.real, log_a.imag, levels=levels, block=4)
    torch.testing.assert_close(torch.complex(real, imag), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [value_classifier, token_backbone,
                                  lambda: value_classifier(bidirectional=True, pooling="last"),
                                  lambda: token_backbone(bidirectional=False, prenorm=False, norm="batch"),
                                  lambda: build(S4DSSForSequenceClassification, vocab_size=20, d_model=4, n_layers=1,
                                                d_state=4, num_labels=2, pooling="last"),
                                  lambda: build(S4DSSModel, input_dim=3, d_model=6, n_layers=1, d_state=3)],
                         ids=["values-classifier", "tokens-bidirectional-backbone", "bidirectional-last-pooling",
                              "tokens-postnorm-batchnorm-backbone", "tokens-classifier", "values-backbone"])
def test_whole_sequence_module_equals_eager_on_padded_batches(make):
    model = make()
    module = WholeSequenceModule(model)
    generator = torch.Generator().manual_seed(5)
    for length in (1, 2, 33, *LENGTHS):
        batch = 3 if length > 1 else 1
        inputs, mask = example_inputs(model, batch, length, generator), padded_mask(batch, length)
        with torch.no_grad():
            output = module(inputs, mask)
        assert not output.is_complex()
        assert_matches_eager(output, eager(model, inputs, mask), mask)


def test_whole_sequence_module_holds_no_complex_tensor_and_is_a_frozen_copy():
    model = token_backbone()
    module = WholeSequenceModule(model)
    tensors = [*module.parameters(), *module.buffers()]
    assert tensors and not any(t.is_complex() or t.requires_grad for t in tensors)
    inputs, mask = example_inputs(model, 2, 50, torch.Generator().manual_seed(0)), padded_mask(2, 50)
    before = module(inputs, mask)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(module(inputs, mask), before, rtol=0, atol=0)


# ------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    models = {"classifier": value_classifier(), "backbone": token_backbone()}
    descriptions = {name: export_model(model, folder / name, format="onnx", whole_sequence=True)
                    for name, model in models.items()}
    return folder, models, descriptions


@pytest.mark.parametrize("name", ["classifier", "backbone"])
def test_onnx_whole_sequence_equals_eager_at_dynamic_lengths(onnx_exports, name):
    folder, models, _ = onnx_exports
    model, runner = models[name], load_exported(folder / name)
    assert isinstance(runner, ExportedWholeSequenceModel)
    generator = torch.Generator().manual_seed(7)
    for batch, length in ((1, 1), (2, 5), *((3, length) for length in LENGTHS)):
        inputs, mask = example_inputs(model, batch, length, generator), padded_mask(batch, length)
        assert_matches_eager(runner(inputs, mask), eager(model, inputs, mask), mask)
    inputs = example_inputs(model, 2, 100, generator)  # the mask defaults to all valid
    assert_matches_eager(runner(inputs), eager(model, inputs, None), torch.ones(2, 100))


def test_onnx_padded_positions_never_change_valid_outputs(onnx_exports):
    folder, models, _ = onnx_exports
    for name, model in models.items():
        runner = load_exported(folder / name)
        generator = torch.Generator().manual_seed(11)
        inputs, mask = example_inputs(model, 3, 200, generator), padded_mask(3, 200)
        other = torch.where(mask.bool().reshape(mask.shape + (1,) * (inputs.dim() - 2)),
                            inputs, example_inputs(model, 3, 200, generator))
        first, second = runner(inputs, mask), runner(other, mask)
        if first.dim() == 3:
            first, second = first[mask.bool()], second[mask.bool()]
        torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-6)


def test_onnx_graph_has_dynamic_batch_and_length_and_no_complex_type(onnx_exports):
    folder, models, descriptions = onnx_exports
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    for name in ("classifier", "backbone"):
        graph = onnx.load(str(folder / name / "model.onnx")).graph
        assert [entry.name for entry in graph.input] == ["inputs", "attention_mask"]
        for entry in graph.input:  # batch and length are symbols, not sizes
            dims = entry.type.tensor_type.shape.dim
            assert dims[0].dim_param and dims[1].dim_param and not dims[0].dim_value and not dims[1].dim_value
        output_dims = graph.output[0].type.tensor_type.shape.dim
        assert output_dims[0].dim_param == graph.input[0].type.tensor_type.shape.dim[0].dim_param
        if name == "backbone":  # (batch, length, d_model): the input's length symbol
            assert output_dims[1].dim_param == graph.input[0].type.tensor_type.shape.dim[1].dim_param
        values = [*graph.input, *graph.output, *graph.value_info]
        element_types = {value.type.tensor_type.elem_type for value in values}
        element_types |= {tensor.data_type for tensor in graph.initializer}
        for node in graph.node:  # constants inside the graph
            element_types |= {attribute.t.data_type for attribute in node.attribute if attribute.HasField("t")}
        assert element_types and not element_types & complex_types
        assert not {node.op_type for node in graph.node} & {"DFT", "STFT"}
        # the power tables stay computations on the modes: no initializer beyond the largest parameter
        largest = max(FOLD_LIMIT, *(p.numel() for p in models[name].parameters()))
        assert max(int(np.prod(tensor.dims)) for tensor in graph.initializer) <= largest
        description = descriptions[name]
        assert json.loads((folder / name / "export.json").read_text()) == description


def test_export_json_describes_the_whole_sequence_graph(onnx_exports):
    folder, _, descriptions = onnx_exports
    classifier, backbone = descriptions["classifier"], descriptions["backbone"]
    assert classifier["mode"] == "whole_sequence" and classifier["int8_graph"] is None
    assert classifier["inputs"] == [
        {"name": "inputs", "shape": ["batch", "length", 2], "dtype": "float32",
         "meaning": "input values of every position"},
        {"name": "attention_mask", "shape": ["batch", "length"], "dtype": "int64",
         "meaning": "1 for a valid position, 0 for padding; every sequence needs one valid position"}]
    assert classifier["outputs"][0]["name"] == "logits" and classifier["outputs"][0]["shape"] == ["batch", 3]
    assert backbone["inputs"][0]["shape"] == ["batch", "length"] and backbone["inputs"][0]["dtype"] == "int64"
    assert backbone["outputs"][0]["shape"] == ["batch", "length", 4]
    assert backbone["model"]["bidirectional"] is True and backbone["model"]["vocab_size"] == 20
    for description in descriptions.values():
        check = description["check"]
        assert check["lengths"] == [1, 37, 300] and check["max_abs_error"] <= 1e-4 * check["max_abs_output"]
    assert "Exported whole-sequence forward" in (folder / "classifier" / "README.md").read_text()
    assert sorted(os.listdir(folder / "classifier")) == ["README.md", "config.json", "export.json", "model.onnx"]


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(mode="batch"), "mode"),
    (lambda d: d.update(format="executorch", graph="model.pte"), "format"),
    (lambda d: d.update(int8_graph="model.int8.onnx"), "int8_graph"),
    (lambda d: d["inputs"].pop(), "inputs"),
    (lambda d: d["inputs"][1].update(shape=["batch", 7]), r"inputs\[1\].shape"),
    (lambda d: d["inputs"][0].update(shape=["batch", "time"]), r"inputs\[0\].shape"),
    (lambda d: d["outputs"].append(dict(d["outputs"][0], name="extra")), "outputs"),
])
def test_export_json_schema_refuses_a_malformed_whole_sequence_description(onnx_exports, edit, field):
    _, _, descriptions = onnx_exports
    description = json.loads(json.dumps(descriptions["classifier"]))
    edit(description)
    with pytest.raises(ExportFolderError, match=f"`{field}`"):
        validate_description(description, "export.json")


def test_streaming_description_refuses_a_length_axis(onnx_exports):
    _, _, descriptions = onnx_exports
    description = json.loads(json.dumps(descriptions["classifier"]))
    description["mode"] = "streaming"
    with pytest.raises(ExportFolderError, match=r"inputs\[0\].shape"):
        validate_description(description, "export.json")


def test_runner_checks_its_inputs_before_the_runtime(onnx_exports):
    folder, _, _ = onnx_exports
    values, tokens = load_exported(folder / "classifier"), load_exported(folder / "backbone")
    good = torch.randn(2, 10, 2)
    with pytest.raises(ValueError, match=r"`inputs` must be float32 of shape \('batch', 'length', 2\)"):
        values(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="float32"):
        values(good.double())
    with pytest.raises(ValueError, match="at least one sequence and one position"):
        values(torch.randn(2, 0, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        values(good, torch.ones(2, 9))
    with pytest.raises(ValueError, match="only 0"):
        values(good, torch.full((2, 10), 2))
    with pytest.raises(ValueError, match="at least one valid position"):
        values(good, torch.tensor([[1] * 10, [0] * 10]))
    with pytest.raises(ValueError, match=r"vocabulary \[0, 20\)"):
        tokens(torch.tensor([[3, 20]]))
    with pytest.raises(ValueError, match=r"vocabulary \[0, 20\)"):
        tokens(torch.tensor([[3, -1]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(values(good[:, :3], mask), values(good[:, :3], mask.bool()))  # bool masks too
    torch.testing.assert_close(values(good[:, :3].numpy(), mask.numpy()), values(good[:, :3], mask))
    assert isinstance(values(np.zeros((1, 4, 2), dtype=np.float32)), torch.Tensor)
    with pytest.raises(ValueError, match="no int8 version"):
        load_exported(folder / "classifier", int8=True)
    description = json.loads((folder / "classifier" / "export.json").read_text())
    with pytest.raises(ValueError, match="describes a whole_sequence graph, not a streaming one"):
        ExportedStreamingModel(folder / "classifier", description, "model.onnx")


# ------------------------------------------------------------------ torch.export and the CLI
def test_cli_whole_sequence_torch_export_with_a_dynamic_length(tmp_path, capsys):
    model = build(S4DSSForSequenceClassification, vocab_size=20, d_model=6, n_layers=1, d_state=4, num_labels=2,
                  pooling="last", bidirectional=True, dt_min=0.001, dt_max=0.1)
    model.save_pretrained(tmp_path / "saved")
    assert cli_main(["export", "--model", str(tmp_path / "saved"), "--output", str(tmp_path / "out"),
                     "--format", "torch", "--whole-sequence"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["graph"] == "model.pt2" and report["mode"] == "whole_sequence"
    with pytest.raises(ValueError, match="trust_pickle"):
        load_exported(tmp_path / "out")
    runner = load_exported(tmp_path / "out", trust_pickle=True)
    generator = torch.Generator().manual_seed(3)
    for batch, length in ((1, 3), (3, 16), (2, 4096)):  # lengths never traced
        inputs, mask = example_inputs(model, batch, length, generator), padded_mask(batch, length)
        assert_matches_eager(runner(inputs, mask), eager(model, inputs, mask), mask)
    for arguments in (["--format", "executorch"], ["--int8"]):
        with pytest.raises(SystemExit) as refused:
            cli_main(["export", "--model", str(tmp_path / "saved"), "--output", str(tmp_path / "x"),
                      "--whole-sequence", *arguments])
        assert refused.value.code == 2 and "--whole-sequence" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_whole_sequence_refusals_write_nothing(tmp_path):
    model = value_classifier()
    with pytest.raises(ValueError, match="format='onnx'` or `format='torch'"):
        export_model(model, tmp_path / "a", format="executorch", whole_sequence=True)
    with pytest.raises(ValueError, match="int8"):
        export_model(model, tmp_path / "a", format="onnx", int8=True, whole_sequence=True)
    with pytest.raises(TypeError, match="whole_sequence"):
        export_model(model, tmp_path / "a", whole_sequence="yes")
    with pytest.raises(ValueError, match="eval"):
        export_model(value_classifier().train(), tmp_path / "a", whole_sequence=True)
    assert os.listdir(tmp_path) == []


def test_a_whole_sequence_export_that_disagrees_with_eager_is_refused(tmp_path, monkeypatch):
    import s4bt_hf.export.whole_sequence as whole_sequence

    real_forward = whole_sequence.WholeSequenceModule.forward
    monkeypatch.setattr(whole_sequence.WholeSequenceModule, "forward",
                        lambda self, inputs, mask: real_forward(self, inputs, mask) * 1.01)
    # one small layer: the refusal does not depend on the size, and each layer lengthens the export
    with pytest.raises(ValueError, match="disagrees with the eager model"):
        export_model(value_classifier(n_layers=1, d_state=4), tmp_path / "out", format="torch", whole_sequence=True)
    assert os.listdir(tmp_path) == []
