"""Export the streaming step of an S4-DSS model for edge runtimes: ONNX (through
`torch.onnx.export(..., dynamo=True)`, optionally int8), a `torch.export` program (`.pt2`) or an
ExecuTorch program lowered to XNNPACK (`.pte`).

What is exported is `model.streaming_module()`: one position per call, real tensors only, the
state passed in and returned explicitly (see `streaming_real.py`). With `whole_sequence=True` it is
the model's forward on whole sequences, `(inputs, attention_mask) -> output`, with a dynamic batch
and length (see `whole_sequence.py`). The output folder holds

    model.onnx | .pt2 | .pte  the graph: (inputs, *states) -> (output, *new_states)
    model.int8.onnx           with `int8=True`: linear layers int8 (dynamic), SSM recurrence fp32
    export.json               inputs, outputs and states: names, shapes, dtypes; the vocabulary size;
                              checks; each graph's size and SHA-256 (verified by `load_exported`)
    README.md, config.json    the model card and configuration of the exported model

`load_exported(folder)` (loader.py) runs an exported folder from Python after checking it against
export.json (description.py). Not part of the remote code of checkpoints (modeling_s4dss.py does
not import it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import tempfile
import warnings

import torch

from ..safe_io import staged_folder

EXPORT_FORMATS = ("onnx", "torch", "executorch")
DESCRIPTION_FILE = "export.json"
GRAPH_FILES = {"onnx": "model.onnx", "torch": "model.pt2", "executorch": "model.pte"}
INT8_FILE = "model.int8.onnx"
EXPORT_EXTRA = 'pip install "s4bt-hf[export]"'
EXECUTORCH_EXTRA = 'pip install "s4bt-hf[executorch]"'
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
CHECK_STEPS = 32  # steps compared against eager streaming right after export
# onnxruntime's CPU kernels have no float64 Erf (GELU) and no bfloat16 Gemm: such graphs export but cannot run
ONNX_UNSUPPORTED_DTYPES = (torch.float64, torch.bfloat16)


class ExportDependencyError(ImportError):
    """A package of the `[export]` extra is missing."""


def require_export_dependencies(modules=ONNX_MODULES, what: str = "ONNX export", extra: str = EXPORT_EXTRA) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportDependencyError(f"{what} needs {', '.join(missing)}: install it with `{extra}`.")


def export_model(model, output_dir, *, format: str = "onnx", int8: bool = False, whole_sequence: bool = False,
                 preprocessor=None) -> dict:
    """Export the streaming step of an eval-mode, unidirectional S4-DSS model into a NEW folder
    (or, with `whole_sequence=True`, its whole-sequence forward).

    Args:
        model: `S4DSSForSequenceClassification` or `S4DSSModel` (a compressed one works the same).
        output_dir: folder to create; refused if it exists and is not empty (nothing is overwritten).
        format: `"onnx"` (any batch size), `"torch"` (a `torch.export` program, `.pt2`, any batch
            size) or `"executorch"` (`.pte` lowered to XNNPACK, batch 1; needs the executorch extra).
        int8: also write `model.int8.onnx` (ONNX only): dynamic int8 quantisation of the linear
            layers by onnxruntime; the SSM recurrence stays in float32.
        whole_sequence: export `forward` on whole sequences instead (`format="onnx"` or `"torch"`):
            `(inputs, attention_mask) -> logits` (classifier) or `last_hidden_state` (backbone), with
            a dynamic batch and length, bidirectional models included, real arithmetic only (see
            `whole_sequence.py`); checked against the eager model right after export.
        preprocessor: what prepared the model's inputs in training (an `S4DSSFeatureExtractor` or a
            tokenizer; anything with `save_pretrained`): saved beside the graph (its files are listed
            in export.json under `preprocessor`). The graph does NOT apply it: normalise (or tokenize)
            inputs with it before calling the graph.
    Returns: the description written to export.json.
    """
    from ..modeling_s4dss import S4DSSPreTrainedModel

    if not isinstance(model, S4DSSPreTrainedModel):
        raise TypeError(f"`model` must be an S4-DSS model (S4DSSPreTrainedModel), got {type(model).__name__}.")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    if not isinstance(int8, bool):
        raise TypeError(f"`int8` must be a bool, got {type(int8).__name__}.")
    if int8 and format != "onnx":
        raise ValueError("`int8=True` quantises with onnxruntime: it needs `format='onnx'`.")
    if not isinstance(whole_sequence, bool):
        raise TypeError(f"`whole_sequence` must be a bool, got {type(whole_sequence).__name__}.")
    if whole_sequence and format == "executorch":
        raise ValueError("`whole_sequence=True` exports with a dynamic length: it needs `format='onnx'` or "
                         "`format='torch'` (the ExecuTorch export is the streaming step, batch 1).")
    if whole_sequence and int8:
        raise ValueError("`int8=True` quantises every MatMul, which in the whole-sequence graph includes the SSM "
                         "convolution: it is only offered for the streaming step (`whole_sequence=False`).")
    if preprocessor is not None and not callable(getattr(preprocessor, "save_pretrained", None)):
        raise TypeError(f"`preprocessor` must have `save_pretrained` (a feature extractor or a tokenizer), got "
                        f"{type(preprocessor).__name__}.")
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a path, got {type(output_dir).__name__}.")
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"`output_dir` {output_dir} already exists and is not an empty folder; nothing was "
                              "written. Choose a new folder.")
    if whole_sequence:
        from . import whole_sequence as sequence_export

        module = sequence_export.WholeSequenceModule(model)  # refuses training mode
    else:
        module = model.streaming_module()  # refuses bidirectional models and training mode
    if format == "onnx":
        _check_onnx_dtypes(model)
        require_export_dependencies()
    if format == "executorch":
        require_export_dependencies(("executorch",), "ExecuTorch export", EXECUTORCH_EXTRA)

    # written in a staging folder renamed into place when complete (stale ones of killed exports are removed)
    with staged_folder(output_dir) as staging:
        graph_path = os.path.join(staging, GRAPH_FILES[format])
        with _quiet_exporter():
            opset = None
            if whole_sequence and format == "onnx":
                opset = sequence_export.export_whole_sequence_onnx(module, graph_path)
            elif whole_sequence:
                torch.export.save(sequence_export.whole_sequence_program(module), graph_path)
            elif format == "onnx":
                opset = _export_onnx(module, graph_path)
            elif format == "torch":
                torch.export.save(_torch_export(module), graph_path)
            else:
                _export_executorch(module, graph_path)
            if int8:
                _quantize_int8(graph_path, os.path.join(staging, INT8_FILE))
        if whole_sequence:
            description = sequence_export.describe_whole_sequence(model, module, format, opset)
        else:
            description = describe(model, module, format, int8, opset)
        # the graphs are complete: record what `load_exported` verifies, then check through that same path
        graphs = sorted(os.listdir(staging))
        description["file_bytes"] = {name: os.path.getsize(os.path.join(staging, name)) for name in graphs}
        description["sha256"] = {name: _sha256(os.path.join(staging, name)) for name in graphs}
        if whole_sequence:
            description["check"] = sequence_export.check_against_eager(model, module, staging, description)
        else:
            description["check"] = _check_against_eager(model, module, staging, description)
        if preprocessor is not None:  # recorded beside the graph, not applied by it
            before = set(os.listdir(staging))
            preprocessor.save_pretrained(staging)
            description["preprocessor"] = sorted(set(os.listdir(staging)) - before)
        _write_card_and_config(model, staging, description)
        with open(os.path.join(staging, DESCRIPTION_FILE), "w", encoding="utf-8") as handle:
            json.dump(description, handle, indent=2)
    return description


def _check_onnx_dtypes(model) -> None:
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.dtype in ONNX_UNSUPPORTED_DTYPES:
            raise ValueError(
                f"ONNX export needs a float32 (or float16) model: this one holds {_dtype_name(tensor.dtype)} tensors "
                f"(`{name}`), which onnxruntime cannot run on CPU. Convert it first with `model.float()` (in place; "
                "`copy.deepcopy(model).float()` keeps the original), or export with `format='torch'`."
            )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters log optional-dependency notes and deprecation warnings that are not ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _dynamic_batch(module):
    batch = torch.export.Dim("batch", min=1)
    return ({0: batch}, tuple({0: batch} for _ in module.state_names()))


def _export_onnx(module, path: str) -> int:
    names = ["inputs", *module.state_names()]
    program = torch.onnx.export(
        module, module.example_inputs(2), dynamo=True, input_names=names,
        output_names=[_output_name(module), *(f"new_{name}" for name in module.state_names())],
        dynamic_shapes=_dynamic_batch(module), verbose=False,
    )
    program.save(path)
    return max(int(entry.version) for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx"))


def _torch_export(module):
    return torch.export.export(module, module.example_inputs(2), dynamic_shapes=_dynamic_batch(module))


def _export_executorch(module, path: str) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # batch 1: a device streams one sequence; static shapes lower fully to XNNPACK
    program = torch.export.export(module, module.example_inputs(1))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as handle:
        handle.write(lowered.buffer)


def _quantize_int8(source: str, target: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = os.path.join(scratch, "prepared.onnx")  # shape inference + folding, as onnxruntime advises
        quant_pre_process(source, prepared)
        # MatMul/Gemm only: the linear layers. The recurrence is Mul/Add and stays float32 (Q-S5:
        # recurrent weights below 8 bits degrade; the dynamic quantiser leaves those ops alone).
        quantize_dynamic(prepared, target, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                         per_channel=True)


def _output_name(module) -> str:
    return "logits" if module.is_classifier else "hidden_state"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(model, module, format: str, int8: bool, opset) -> dict:
    """The export.json description: every input, output and state with shape and dtype."""
    config = model.config
    batch = 1 if format == "executorch" else "batch"  # ExecuTorch: static shapes
    input_entry = {
        "name": "inputs",
        "shape": [batch] if module.uses_tokens else [batch, module.input_dim],
        "dtype": _dtype_name(module.input_dtype),
        "meaning": "token ids of one position" if module.uses_tokens else "input values of one position",
    }
    states = []
    for name, shape, dtype in zip(module.state_names(), module.state_shapes(1), module.state_dtypes(), strict=True):
        meaning = {"pooled_sum": "running sum of the outputs (mean pooling)",
                   "pooled_count": "positions read so far (mean pooling)"}.get(
            name, "SSM state of one layer: (re, im) of every complex mode")
        states.append({"name": name, "shape": [batch, *shape[1:]], "dtype": _dtype_name(dtype),
                       "initial": "zeros", "meaning": meaning})
    output_shape = [batch, config.num_labels] if module.is_classifier else [batch, config.d_model]
    outputs = [{"name": _output_name(module), "shape": output_shape, "dtype": _dtype_name(module.encoder.weight.dtype),
                "meaning": "logits of the prefix read so far" if module.is_classifier
                else "hidden state at this position"}]
    outputs += [{**state, "name": f"new_{state['name']}", "meaning": "feed back as " + state["name"]}
                for state in states]
    state_elements = sum(int(torch.Size(shape[1:]).numel()) for shape in module.state_shapes(1))
    state_bytes = sum(int(torch.Size(shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
                      for shape, dtype in zip(module.state_shapes(1), module.state_dtypes(), strict=True))
    return {
        "format": format,
        "mode": "streaming",
        "graph": GRAPH_FILES[format],
        "int8_graph": INT8_FILE if int8 else None,
        "int8_scope": "linear layers (MatMul/Gemm) int8 dynamic; SSM recurrence float32" if int8 else None,
        "opset": opset,
        "call": "(inputs, *states) -> (output, *new_states); every tensor shares the batch size"
                + (" (1 in this static ExecuTorch program)" if format == "executorch" else ""),
        "inputs": [input_entry, *states],
        "outputs": outputs,
        "model": model_description(model, module, list(module.d_states)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_elements_per_sequence": state_elements,
        "state_bytes_per_sequence": state_bytes,
        "versions": runtime_versions(format),
    }


def runtime_versions(format: str) -> dict:
    """The versions export.json records: torch, and for ONNX the exporter's and runtime's packages."""
    names = ("onnx", "onnxscript", "onnxruntime") if format == "onnx" else ()
    return {"torch": torch.__version__, **{name: importlib.import_module(name).__version__ for name in names}}


def model_description(model, module, d_states: list, **extra) -> dict:
    """export.json's `model` entry: what was exported (either mode)."""
    config = model.config
    return {
        "class": type(model).__name__,
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "d_state": d_states,
        **extra,
        "input": "input_ids" if module.uses_tokens else "input_values",
        "vocab_size": config.vocab_size if module.uses_tokens else None,
        "pooling": config.pooling if module.is_classifier else None,
        "num_labels": config.num_labels if module.is_classifier else None,
        "id2label": {str(k): v for k, v in config.id2label.items()} if module.is_classifier else None,
        "compressed": model.compression_report is not None,
    }


def _check_against_eager(model, module, folder: str, description: dict) -> dict:
    """Run the exported graph(s) for CHECK_STEPS steps on random inputs next to `streaming_step`."""
    from .loader import ExportedStreamingModel  # loader imports this module's constants

    generator = torch.Generator().manual_seed(0)
    batch = 1 if description["format"] == "executorch" else 2
    if module.uses_tokens:
        inputs = torch.randint(0, model.config.vocab_size, (CHECK_STEPS, batch), generator=generator)
    else:
        inputs = torch.randn(CHECK_STEPS, batch, module.input_dim, generator=generator, dtype=module.input_dtype)
    key = "input_ids" if module.uses_tokens else "input_values"
    with torch.no_grad():
        state = model.init_streaming_state(batch)
        expected = []
        for position in inputs:
            output, state = model.streaming_step(state, **{key: position})
            expected.append(output)
    expected = torch.stack(expected)
    result = {"steps": CHECK_STEPS, "batch": batch}
    graphs = {"max_abs_error": description["graph"]}
    if description["int8_graph"]:
        graphs["int8_max_abs_error"] = description["int8_graph"]
    for key_name, graph in graphs.items():
        runner = ExportedStreamingModel(folder, description, graph, trust_pickle=True)  # the graph just written
        outputs = runner.run(inputs)
        result[key_name] = float((torch.as_tensor(outputs) - expected).abs().max())
    result["max_abs_output"] = float(expected.abs().max())
    return result


def _write_card_and_config(model, folder: str, description: dict) -> None:
    from ..model_card import render_model_card

    model.config.to_json_file(os.path.join(folder, "config.json"))
    card = render_model_card(model)
    if description.get("preprocessor"):
        card += ("\n## Preprocessing\n\nThe graph takes inputs as the model was trained on them: prepare them "
                 f"with the preprocessor saved here ({', '.join(f'`{name}`' for name in description['preprocessor'])};"
                 " `AutoFeatureExtractor` / `AutoTokenizer.from_pretrained(folder)`). The graph does not apply it.\n")
    if description.get("mode") == "whole_sequence":
        from .whole_sequence import card_section

        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card + card_section(description))
        return
    shapes = "\n".join(f"| `{entry['name']}` | {tuple(entry['shape'])} | {entry['dtype']} | {entry['meaning']} |"
                       for entry in description["inputs"])
    card += (
        "\n## Exported streaming step\n\n"
        f"`{description['graph']}` ({description['format']}) runs one position per call: "
        f"`{description['call']}`. Start from zero states; feed each `new_*` output back as the state.\n\n"
        "| input | shape | dtype | meaning |\n|---|---|---|---|\n" + shapes + "\n\n"
        f"State per sequence: {description['state_bytes_per_sequence']} bytes. "
        f"Checked against eager streaming over {description['check']['steps']} steps: max abs error "
        f"{description['check']['max_abs_error']:.2e}"
        + (f" (int8: {description['check']['int8_max_abs_error']:.2e})" if description["int8_graph"] else "")
        + ". Full description: `export.json`.\n"
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
