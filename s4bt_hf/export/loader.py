"""Run an exported folder (written by `export_model`) from Python: onnxruntime for `.onnx`,
`torch.export.load` for `.pt2` (only with `trust_pickle=True`), the ExecuTorch runtime for `.pte`.
export.json is validated and the graph verified against it (description.py) before a runtime reads
it; every input is checked against export.json before it reaches the runtime.

Why only `.pt2` needs a flag: `torch.export.load` unpickles the entries a program marks as pickled,
so a crafted file runs code when loaded (as `torch.load` without `weights_only`). onnxruntime parses
a protobuf graph and ExecuTorch a FlatBuffers program (verified for internal consistency here) with
no Python deserialisation: a crafted file can give wrong outputs, not run Python code.
"""

from __future__ import annotations

import io
import os

import torch

from .description import DESCRIPTION_FILE, read_description, read_verified_graph, validate_description
from .exporter import EXECUTORCH_EXTRA, require_export_dependencies
from .whole_sequence import check_mask_values

PICKLE_REFUSED = (
    "{graph} is a torch.export program: `torch.export.load` unpickles parts of it, which can run arbitrary code "
    "from whoever wrote the file. Load it only if you trust its source, with `load_exported(folder, "
    "trust_pickle=True)`; ONNX and ExecuTorch exports need no such flag."
)


class ExportedGraph:
    """An exported graph loaded into its runtime: onnxruntime for `.onnx`, `torch.export.load` for
    `.pt2` (only with `trust_pickle=True`), the ExecuTorch runtime for `.pte`. The description is
    validated and the graph verified before it is loaded."""

    mode = None  # the export.json `mode` this runner runs
    intra_op_threads = 1  # onnxruntime threads per call (0: its default, every core)
    ort_log_severity = 2  # onnxruntime's default: warnings and above

    def __init__(self, folder: str, description: dict, graph: str, *, trust_pickle: bool = False):
        if not isinstance(trust_pickle, bool):
            raise TypeError(f"`trust_pickle` must be a bool, got {type(trust_pickle).__name__}.")
        folder = os.fspath(folder)
        validate_description(description, os.path.join(folder, DESCRIPTION_FILE))
        mode = description.get("mode", "streaming")
        if mode != self.mode:
            raise ValueError(f"{os.path.join(folder, DESCRIPTION_FILE)} describes a {mode} graph, not a {self.mode} "
                             "one: open it with `load_exported(folder)`.")
        if graph not in (description["graph"], description["int8_graph"]) or graph is None:
            raise ValueError(f"`graph` must be a graph named in {DESCRIPTION_FILE} ({description['graph']}"
                             + (f" or {description['int8_graph']}" if description["int8_graph"] else "")
                             + f"), got {graph!r}.")
        format = description["format"]
        if format == "torch" and not trust_pickle:
            raise ValueError(PICKLE_REFUSED.format(graph=os.path.join(folder, graph)))
        self.folder = folder
        self.description = description
        self.graph = graph
        self.inputs = description["inputs"]
        model = description["model"]
        self.vocab_size = model.get("vocab_size") if model["input"] == "input_ids" else None
        self.session = self._program = self._method = None
        # the runtime gets the verified bytes, not the path: nothing can be swapped in between
        if format == "onnx":
            require_export_dependencies(("onnxruntime",))
            import onnxruntime

            data = read_verified_graph(folder, description, graph)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.log_severity_level = self.ort_log_severity
            self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        elif format == "executorch":
            require_export_dependencies(("executorch",), "Running an ExecuTorch program", EXECUTORCH_EXTRA)
            from executorch.runtime import Runtime, Verification

            data = read_verified_graph(folder, description, graph)
            program = Runtime.get().load_program(data, verification=Verification.InternalConsistency)
            self._method = program.load_method("forward")
        else:
            data = read_verified_graph(folder, description, graph)
            self._program = torch.export.load(io.BytesIO(data)).module()


class ExportedStreamingModel(ExportedGraph):
    """An exported streaming step, run from Python (see `ExportedGraph`); every input (token ids:
    their range too) is checked against export.json before it reaches the runtime.

        runner = load_exported("exported/")            # or load_exported(folder, int8=True)
        state = runner.initial_state(batch_size=1)
        for x_t in sequence:
            output, state = runner.step(x_t, state)
    """

    mode = "streaming"
    intra_op_threads = 1  # one position per call: threads only add overhead

    def initial_state(self, batch_size: int) -> list:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        states = []
        for entry in self.inputs[1:]:
            shape = (batch_size, *entry["shape"][1:])
            tensor = torch.zeros(shape, dtype=getattr(torch, entry["dtype"]))
            states.append(tensor.numpy() if self.session is not None else tensor)
        return states

    def _check(self, values) -> int:
        if len(values) != len(self.inputs):
            raise ValueError(f"The exported step takes {len(self.inputs)} tensors (inputs and "
                             f"{len(self.inputs) - 1} states, see {DESCRIPTION_FILE}), got {len(values)}.")
        batch = None
        for entry, value in zip(self.inputs, values, strict=True):
            shape = tuple(getattr(value, "shape", ()))
            dtype = str(getattr(value, "dtype", type(value).__name__)).removeprefix("torch.")
            expected = tuple(entry["shape"])
            batch = shape[0] if batch is None and shape else batch
            wanted = (expected[0] if isinstance(expected[0], int) else batch, *expected[1:])
            if len(shape) != len(expected) or shape != wanted or dtype != entry["dtype"]:
                raise ValueError(
                    f"`{entry['name']}` must be {entry['dtype']} of shape {expected} with batch {batch} "
                    f"({entry['meaning']}; see {DESCRIPTION_FILE}), got {dtype} of shape {shape}."
                )
        return batch

    def _check_token_ids(self, inputs) -> None:
        """The graph's Gather wraps a negative id (-1 reads the last row): refuse ids outside the vocabulary."""
        ids = torch.as_tensor(inputs).reshape(-1).tolist()  # one position: a few ids, cheapest as a list
        if ids:
            low, high = min(ids), max(ids)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"`inputs` holds token ids outside the vocabulary [0, {self.vocab_size}) "
                                 f"(model.vocab_size in {DESCRIPTION_FILE}): min {low}, max {high}.")

    def step(self, inputs, state):
        """One position: `inputs` and the state list -> (output, new state list)."""
        values = [inputs, *state]
        self._check(values)
        if self.vocab_size is not None:
            self._check_token_ids(inputs)
        if self.session is not None:
            feed = {entry["name"]: (value.numpy() if isinstance(value, torch.Tensor) else value)
                    for entry, value in zip(self.inputs, values, strict=True)}
            output, *new_state = self.session.run(None, feed)
        elif self._method is not None:
            output, *new_state = self._method.execute([torch.as_tensor(value) for value in values])
        else:
            with torch.no_grad():
                output, *new_state = self._program(*[torch.as_tensor(value) for value in values])
        return output, new_state

    def run(self, sequence):
        """Stream a whole (L, B, ...) sequence from the zero state; returns the (L, B, ...) outputs."""
        state = self.initial_state(int(sequence.shape[1]))
        outputs = []
        for position in sequence:
            output, state = self.step(position, state)
            outputs.append(torch.as_tensor(output))
        return torch.stack(outputs)


class ExportedWholeSequenceModel(ExportedGraph):
    """An exported whole-sequence forward (`export_model(..., whole_sequence=True)`), run from Python:

        runner = load_exported("exported/")
        logits = runner(input_ids, attention_mask)      # or runner(input_values, attention_mask)

    `inputs` (batch, length) token ids or (batch, length, input_dim) values, any batch and length;
    `attention_mask` (batch, length) of 0/1 (default: all valid). Both are checked against
    export.json (shapes, dtypes, token ids in the vocabulary, mask values) before the runtime sees
    them. Returns the output as a torch tensor.
    """

    mode = "whole_sequence"
    intra_op_threads = 0  # whole sequences: onnxruntime's default (every core)
    # errors only: at load, onnxruntime warns about each CastLike node its constant folding skips
    ort_log_severity = 3

    def _inputs(self, inputs, attention_mask):
        inputs = torch.as_tensor(inputs)
        entry = self.inputs[0]
        rank = len(entry["shape"])
        wanted_dtype = getattr(torch, entry["dtype"])
        if inputs.dim() != rank or tuple(inputs.shape[2:]) != tuple(entry["shape"][2:]) or inputs.dtype != wanted_dtype:
            shape = ("batch", "length", *entry["shape"][2:])
            raise ValueError(f"`inputs` must be {entry['dtype']} of shape {shape} ({entry['meaning']}; see "
                             f"{DESCRIPTION_FILE}), got {str(inputs.dtype).removeprefix('torch.')} of shape "
                             f"{tuple(inputs.shape)}.")
        if inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise ValueError(f"`inputs` needs at least one sequence and one position, got shape {tuple(inputs.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones(inputs.shape[:2], dtype=torch.int64)
        attention_mask = torch.as_tensor(attention_mask)
        if tuple(attention_mask.shape) != tuple(inputs.shape[:2]) or attention_mask.is_complex():
            raise ValueError(f"`attention_mask` must be a real 0/1 tensor of shape {tuple(inputs.shape[:2])} (batch, "
                             f"length), got {str(attention_mask.dtype).removeprefix('torch.')} of shape "
                             f"{tuple(attention_mask.shape)}.")
        check_mask_values(attention_mask)
        if self.vocab_size is not None:
            low, high = int(inputs.min()), int(inputs.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"`inputs` holds token ids outside the vocabulary [0, {self.vocab_size}) "
                                 f"(model.vocab_size in {DESCRIPTION_FILE}): min {low}, max {high}.")
        return inputs, attention_mask.to(torch.int64)

    def __call__(self, inputs, attention_mask=None) -> torch.Tensor:
        inputs, attention_mask = self._inputs(inputs, attention_mask)
        if self.session is not None:
            output = self.session.run(None, {"inputs": inputs.numpy(), "attention_mask": attention_mask.numpy()})[0]
            return torch.from_numpy(output)
        with torch.no_grad():
            return self._program(inputs, attention_mask)


def load_exported(folder, *, int8: bool = False, trust_pickle: bool = False):
    """Open a folder written by `export_model` (its int8 graph with `int8=True`): an
    `ExportedStreamingModel`, or an `ExportedWholeSequenceModel` for a `whole_sequence=True` export.

    export.json is validated first (one `ExportFolderError` naming the file and the field), then the
    graph is checked to be a plain file of the folder with the size and SHA-256 recorded at export.
    A folder exported before checksums were recorded loads with a warning.

    Args:
        trust_pickle: needed for a `.pt2` (`format="torch"`) folder, because `torch.export.load`
            unpickles parts of the program, which can run code: pass True only for a folder you
            trust (like transformers' `trust_remote_code`). ONNX and ExecuTorch folders ignore it.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"`folder` must be a path, got {type(folder).__name__}.")
    folder = os.fspath(folder)
    description = read_description(folder)
    graph = description["int8_graph"] if int8 else description["graph"]
    if graph is None and description.get("mode") == "whole_sequence":
        raise ValueError(f"{folder} holds a whole-sequence graph, which has no int8 version (int8 is offered for the "
                         "streaming step only).")
    if graph is None:
        raise ValueError(f"{folder} holds no int8 graph: export with `int8=True` (`--int8`).")
    runner = ExportedWholeSequenceModel if description.get("mode") == "whole_sequence" else ExportedStreamingModel
    return runner(folder, description, graph, trust_pickle=trust_pickle)
