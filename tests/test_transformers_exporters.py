"""transformers' own exporters (`transformers.exporters`: `DynamoExporter`, `OnnxExporter`) on both
model classes, uni- and bidirectional, with static and dynamic shapes. Outputs are checked against
the eager forward the way transformers' common export tests check them (the same inputs, every
output tensor by name, 1e-4), and a dynamic export also at batch sizes and lengths it was not traced
at, with padded positions in the mask. While `torch.export` traces the model, each DSS layer
convolves in real arithmetic (`real_convolution_s4dss.py`); outside export the forward is unchanged.

Exports are slow (seconds each, half a minute for a dynamic ONNX graph on a loaded machine), so
the cases cover each class and direction with each exporter and shape mode between them rather than
every combination (a bidirectional layer runs the unidirectional convolution and a reversed one),
and every export is cached for the module and checked at several shapes."""

import copy
import functools

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, S4DSSModel, modeling_s4dss
from s4bt_hf.kernel_s4dss import zoh_discretize
from s4bt_hf.real_convolution_s4dss import real_discrete_system

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
from transformers.exporters import (  # noqa: E402
    DynamoConfig,
    DynamoExporter,
    ExportedModel,
    OnnxConfig,
    OnnxExporter,
)
from transformers.exporters.utils import get_leaf_tensors  # noqa: E402

RELATIVE = 1e-4  # transformers' common test: atol = rtol = 1e-4 for torch.export (1e-3 for ONNX)
TRACED = (2, 12)  # batch, length of the sample inputs every export is traced with
OTHER_SHAPES = ((3, 5), (2, 37), (3, 70))  # lengths below, across and beyond the chunk of 32

MODELS = {
    # tokens, two layers of different orders, small steps (Δ down to 1e-4: B̄ needs an exact expm1)
    "backbone": (S4DSSModel, dict(vocab_size=20, d_model=4, n_layers=2, d_state=[6, 4], prenorm=True,
                                  dt_min=1e-4, dt_max=0.1)),
    "bidirectional-backbone": (S4DSSModel, dict(vocab_size=20, d_model=4, n_layers=1, d_state=4,
                                                bidirectional=True, dt_min=1e-3, dt_max=0.1)),
    # values, BatchNorm with trained statistics
    "classifier": (S4DSSForSequenceClassification, dict(input_dim=2, d_model=6, n_layers=1, d_state=6,
                                                         norm="batch", num_labels=3)),
    "bidirectional-classifier": (S4DSSForSequenceClassification, dict(
        input_dim=2, d_model=6, n_layers=1, d_state=5, norm="batch", num_labels=3, bidirectional=True,
        pooling="last")),
}


@functools.cache
def model(name):
    cls, fields = MODELS[name]
    torch.manual_seed(0)
    built = cls(S4DSSConfig(**fields))
    # O(1) embeddings and linear maps (the default init, std 0.02, leaves the SSM's contribution
    # below the residual's rounding), so that the convolution shows in the outputs and the tolerance
    # discriminates
    generator = torch.Generator().manual_seed(1)
    for module in built.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            fan_in = module.in_features if isinstance(module, torch.nn.Linear) else 1
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
    if fields.get("norm") == "batch":  # statistics that are not the identity
        built.train()
        with torch.no_grad():
            built(**sample(built, 4, 30, seed=99))
    return built.eval()


def sample(model, batch, length, seed=0):
    """Inputs of a call: row 1 padded over its last third, row 2 over its first half (left padding)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if config.uses_tokens:
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, length), generator=generator)}
    else:
        inputs = {"input_values": torch.randn(batch, length, config.input_dim, generator=generator)}
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:
        mask[1, length - length // 3:] = 0
    if batch > 2 and length > 1:
        mask[2, : length // 2] = 0
    inputs["attention_mask"] = mask
    return inputs


@functools.cache
def exported(exporter, dynamic, name):
    """`exporter` ("dynamo" or "onnx") of model `name`, traced at TRACED; `dynamic` is True, False or
    "explicit" (named dims from 1 up, which need the guards deferred to runtime asserts)."""
    inputs = sample(model(name), *TRACED)
    config_class = DynamoConfig if exporter == "dynamo" else OnnxConfig
    if dynamic == "explicit":
        batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1)
        config = config_class(dynamic_shapes={key: {0: batch, 1: length} for key in inputs},
                              prefer_deferred_runtime_asserts_over_guards=True)
    else:
        config = config_class(dynamic=dynamic)
    exporter_class = DynamoExporter if exporter == "dynamo" else OnnxExporter
    return exporter_class().export(model(name), inputs, config)


def assert_matches_eager(name, export, inputs):
    """As transformers' common export test: the eager and exported outputs hold the same tensors by
    name, and each agrees with eager to RELATIVE of its largest value (padded positions included)."""
    with torch.no_grad():
        expected = get_leaf_tensors(model(name)(**copy.deepcopy(inputs)))
        actual = get_leaf_tensors(export(**copy.deepcopy(inputs)))
    assert expected and set(actual) == set(expected)
    for key, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(actual[key], value, rtol=RELATIVE, atol=RELATIVE * scale, msg=key)


def onnx_types(program) -> set:
    """The dtypes of every value and the op types of every node of an ONNX graph."""
    import onnx_ir

    nodes = list(onnx_ir.traversal.RecursiveGraphIterator(program.graph))
    for function in program.functions.values():
        nodes += list(onnx_ir.traversal.RecursiveGraphIterator(function))
    values = [value for node in nodes for value in node.outputs] + list(program.graph.initializers.values())
    return {value.dtype for value in values if value.dtype is not None} | {node.op_type for node in nodes}


# ------------------------------------------------------------------ dynamic shapes
DYNAMIC_CASES = [("dynamo", "backbone"), ("dynamo", "classifier"), ("onnx", "bidirectional-classifier")]


@pytest.mark.parametrize("exporter, name", DYNAMIC_CASES, ids=[f"{e}-{n}" for e, n in DYNAMIC_CASES])
def test_dynamic_export_matches_eager_at_other_batch_sizes_and_lengths(exporter, name):
    export = exported(exporter, True, name)
    assert isinstance(export, ExportedModel)
    for seed, shape in enumerate((TRACED,) + OTHER_SHAPES):
        assert_matches_eager(name, export, sample(model(name), *shape, seed=seed + 1))


def test_dynamic_onnx_graph_is_real_and_saves_and_loads(tmp_path):
    import onnx_ir

    name = "bidirectional-classifier"
    export = exported("onnx", True, name)
    found = onnx_types(export.program)
    assert not found & {onnx_ir.DataType.COMPLEX64, onnx_ir.DataType.COMPLEX128, "DFT", "STFT"}
    export.save_pretrained(tmp_path)
    assert_matches_eager(name, ExportedModel.from_pretrained(tmp_path), sample(model(name), 3, 50))


def test_explicit_dims_from_one_with_deferred_guards():
    """`Dim.AUTO` (`dynamic=True`) specialises sizes 0 and 1 away; named dims from 1 need
    `prefer_deferred_runtime_asserts_over_guards` (slices of the chunked recurrence give guards
    that hold for every length but that the tracer cannot prove), and then run batch 1 and length 1."""
    export = exported("dynamo", "explicit", "bidirectional-backbone")
    for seed, shape in enumerate(((1, 1), (1, 9), (3, 1), (3, 40))):
        assert_matches_eager("bidirectional-backbone", export, sample(model("bidirectional-backbone"), *shape, seed))


# ------------------------------------------------------------------ static shapes
STATIC_CASES = [("dynamo", "bidirectional-classifier"), ("onnx", "backbone")]


@pytest.mark.parametrize("exporter, name", STATIC_CASES, ids=[f"{e}-{n}" for e, n in STATIC_CASES])
def test_static_export_matches_eager_at_the_traced_shape(exporter, name):
    export = exported(exporter, False, name)
    for seed in range(3):  # other values and masks, the same shape
        inputs = sample(model(name), *TRACED, seed=seed)
        inputs["attention_mask"] = inputs["attention_mask"].roll(seed, dims=0)
        assert_matches_eager(name, export, inputs)
    if exporter == "dynamo":  # a static program refuses any other shape
        with pytest.raises(Exception, match="Guard failed"):
            export(**sample(model(name), TRACED[0], TRACED[1] + 1))


# ------------------------------------------------------------------ eager, outside export
@pytest.mark.parametrize("name", list(MODELS))
def test_eager_forward_is_unchanged_outside_export_and_the_real_path_agrees(name, monkeypatch):
    """Outside export the forward never takes the real path (its numbers are the FFT's or the chunked
    recurrence's, as before); both paths agree with the float64 model as closely as float32 allows
    (1e-7 to 6e-6 of the largest output here, the slow modes of the backbones the worst)."""
    original = model(name)
    inputs = sample(original, 3, 70)
    with torch.no_grad():
        reference = get_leaf_tensors(copy.deepcopy(original).double()(**inputs))
        eager = get_leaf_tensors(original(**inputs))

        def refuse(*args, **kwargs):
            raise AssertionError("the real-arithmetic path ran outside export")

        with monkeypatch.context() as patch:
            patch.setattr(modeling_s4dss, "real_convolution", refuse)
            again = get_leaf_tensors(original(**inputs))
        with monkeypatch.context() as patch:
            patch.setattr(torch.compiler, "is_exporting", lambda: True)
            real = get_leaf_tensors(original(**inputs))
    for key, value in reference.items():
        assert torch.equal(again[key], eager[key])
        scale = float(value.abs().max())
        for outputs in (eager, real):
            torch.testing.assert_close(outputs[key].double(), value, rtol=0, atol=2e-5 * scale)


def test_real_discretisation_equals_the_complex_one():
    generator = torch.Generator().manual_seed(3)
    channels, modes = 3, 5
    log_dt = torch.empty(channels, dtype=torch.float64).uniform_(-9.2, -2.3, generator=generator)  # Δ 1e-4 .. 0.1
    log_a_real = torch.randn(channels, modes, generator=generator, dtype=torch.float64)
    a_imag = torch.randn(channels, modes, generator=generator, dtype=torch.float64) * 10
    input_vec = torch.randn(channels, modes, 2, generator=generator, dtype=torch.float64)
    output_vec = torch.randn(2, channels, modes, 2, generator=generator, dtype=torch.float64)
    log_a_bar, input_bar = zoh_discretize(torch.complex(-torch.exp(log_a_real), a_imag), log_dt,
                                          torch.view_as_complex(input_vec))
    weights = torch.view_as_complex(output_vec) * input_bar
    log_re, log_im, weight_re, weight_im = real_discrete_system(log_dt, log_a_real, a_imag, input_vec, output_vec,
                                                                torch.float64)
    torch.testing.assert_close(torch.complex(log_re, log_im), log_a_bar, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.complex(weight_re, weight_im), weights, rtol=1e-12, atol=0)
    # float32 parameters: the discretisation still runs in float64, then rounds once
    single = real_discrete_system(log_dt.float(), log_a_real.float(), a_imag.float(), input_vec.float(),
                                  output_vec.float(), torch.float32)
    assert all(value.dtype == torch.float32 for value in single)
    scale = float(weights.abs().max())
    torch.testing.assert_close(torch.complex(single[2], single[3]).to(torch.complex128), weights, rtol=0,
                               atol=1e-6 * scale)
