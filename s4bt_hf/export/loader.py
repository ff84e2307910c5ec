"""Run an exported folder (written by `export_model`) from Python: onnxruntime for `.onnx`,
`torch.export.load` for `.pt2`, the ExecuTorch runtime for `.pte`; every input is checked against
export.json before it reaches the runtime."""

from __future__ import annotations

import json
import os

import torch

from .exporter import DESCRIPTION_FILE, EXECUTORCH_EXTRA, require_export_dependencies


class ExportedStreamingModel:
    """An exported folder, run from Python: onnxruntime for `.onnx`, `torch.export.load` for `.pt2`,
    the ExecuTorch runtime for `.pte`.
    Every input is checked against export.json before it reaches the runtime.

        runner = load_exported("exported/")            # or load_exported(folder, int8=True)
        state = runner.initial_state(batch_size=1)
        for x_t in sequence:
            output, state = runner.step(x_t, state)
    """

    def __init__(self, folder: str, description: dict, graph: str):
        self.folder = folder
        self.description = description
        self.graph = graph
        self.inputs = description["inputs"]
        path = os.path.join(folder, graph)
        self.session = self._program = self._method = None
        if graph.endswith(".onnx"):
            require_export_dependencies(("onnxruntime",))
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1  # one position per call: threads only add overhead
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        elif graph.endswith(".pte"):
            require_export_dependencies(("executorch",), "Running an ExecuTorch program", EXECUTORCH_EXTRA)
            from executorch.runtime import Runtime

            self._method = Runtime.get().load_program(path).load_method("forward")
        else:
            self._program = torch.export.load(path).module()

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

    def step(self, inputs, state):
        """One position: `inputs` and the state list -> (output, new state list)."""
        values = [inputs, *state]
        self._check(values)
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


def load_exported(folder, *, int8: bool = False) -> ExportedStreamingModel:
    """Open a folder written by `export_model` (its int8 graph with `int8=True`)."""
    path = os.path.join(os.fspath(folder), DESCRIPTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} holds no {DESCRIPTION_FILE}: not a folder written by `export_model`.")
    with open(path, encoding="utf-8") as handle:
        description = json.load(handle)
    graph = description["int8_graph"] if int8 else description["graph"]
    if graph is None:
        raise ValueError(f"{folder} holds no int8 graph: export with `int8=True` (`--int8`).")
    return ExportedStreamingModel(os.fspath(folder), description, graph)
