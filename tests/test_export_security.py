"""What `load_exported` refuses: a `.pt2` without `trust_pickle=True`, a malformed export.json, a graph
that is not the plain file recorded at export (swapped, resized, a symlink out, a fifo), token ids
outside the vocabulary; and what `export_model` refuses up front (ONNX of float64/bfloat16 models)."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.export import ExportFolderError, export_model, load_exported

pytest.importorskip("onnxruntime")

VOCAB = 16


def token_classifier(seed=0):
    torch.manual_seed(seed)
    return S4DSSForSequenceClassification(S4DSSConfig(vocab_size=VOCAB, d_model=6, n_layers=2, d_state=[4, 3],
                                                      num_labels=2, pooling="mean")).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One ONNX export of a token classifier and one of another seed (for a swapped graph)."""
    root = tmp_path_factory.mktemp("exports")
    export_model(token_classifier(0), root / "a", format="onnx")
    export_model(token_classifier(1), root / "b", format="onnx")
    return root


@pytest.fixture
def folder(exported, tmp_path):
    """A fresh copy of the export, to tamper with."""
    return shutil.copytree(exported / "a", tmp_path / "a")


def edit_description(folder, edit):
    path = folder / "export.json"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))


def test_export_json_records_each_graph_sha256_and_the_vocabulary(exported):
    description = json.loads((exported / "a" / "export.json").read_text())
    assert description["sha256"] == {"model.onnx": hashlib.sha256((exported / "a" / "model.onnx").read_bytes())
                                     .hexdigest()}
    assert description["file_bytes"]["model.onnx"] == (exported / "a" / "model.onnx").stat().st_size
    assert description["model"]["vocab_size"] == VOCAB


def test_pt2_loads_only_with_trust_pickle(tmp_path, monkeypatch):
    model = token_classifier(2)
    export_model(model, tmp_path / "pt2", format="torch")  # its own check loads the graph it just wrote
    called = []
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: called.append(args) or real_load(*args, **kwargs))
    with pytest.raises(ValueError, match=r"model.pt2 is a torch.export program: `torch.export.load` unpickles.*"
                                         r"trust_pickle=True"):
        load_exported(tmp_path / "pt2")
    assert called == []  # refused before the file was read
    with pytest.raises(TypeError, match="trust_pickle"):
        load_exported(tmp_path / "pt2", trust_pickle="yes")
    runner = load_exported(tmp_path / "pt2", trust_pickle=True)
    assert len(called) == 1
    tokens = torch.randint(0, VOCAB, (20, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=tokens.T).logits
    torch.testing.assert_close(runner.run(tokens)[-1], expected, rtol=1e-5, atol=1e-5)


def test_a_graph_changed_after_export_is_refused(folder, exported):
    graph = folder / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    graph.write_bytes(bytes(data))
    with pytest.raises(ExportFolderError, match=r"model.onnx does not match the SHA-256 recorded in export.json"):
        load_exported(folder)
    shutil.copyfile(exported / "b" / "model.onnx", graph)  # another model's graph: it used to load silently
    with pytest.raises(ExportFolderError, match="changed or replaced after export"):
        load_exported(folder)
    graph.write_bytes(bytes(data) + b"\0")
    with pytest.raises(ExportFolderError, match=rf"model.onnx is {len(data) + 1} bytes but export.json records "
                                                rf"{len(data)}"):
        load_exported(folder)


@pytest.mark.parametrize("field, edit", [
    ("graph", lambda d: d.update(graph="../a/model.onnx")),
    ("graph", lambda d: d.update(graph="/etc/passwd")),
    ("graph", lambda d: d.update(graph="model.bin")),
    ("int8_graph", lambda d: d.update(int8_graph="../x.onnx")),
    ("format", lambda d: d.update(format="tflite")),
    ("inputs", lambda d: d.pop("inputs")),
    ("inputs", lambda d: d.update(inputs=[])),
    (r"inputs\[1\].dtype", lambda d: d["inputs"][1].update(dtype="load")),
    (r"inputs\[0\].shape", lambda d: d["inputs"][0].update(shape="batch")),
    (r"inputs\[2\].shape", lambda d: d["inputs"][2].update(shape=["batch", -1, 3, 2])),
    (r"inputs\[1\].name", lambda d: d["inputs"][1].update(name="inputs")),
    (r"outputs\[0\].meaning", lambda d: d["outputs"][0].pop("meaning")),
    ("file_bytes", lambda d: d.update(file_bytes={})),
    (r"file_bytes\['model.onnx'\]", lambda d: d["file_bytes"].update({"model.onnx": "12"})),
    (r"sha256 \(a key\)", lambda d: d["sha256"].update({"../model.onnx": "0" * 64})),
    (r"sha256\['model.onnx'\]", lambda d: d["sha256"].update({"model.onnx": "abc"})),
    ("model.vocab_size", lambda d: d["model"].update(vocab_size=0)),
    ("model.input", lambda d: d["model"].update(input="pixels")),
])
def test_a_malformed_export_json_is_one_error_naming_the_file_and_field(folder, field, edit):
    edit_description(folder, edit)
    with pytest.raises(ExportFolderError, match=rf"{folder / 'export.json'}: (the required )?field `{field}`"):
        load_exported(folder)


def test_export_json_that_is_not_a_json_object_or_too_large_is_refused(folder):
    path = folder / "export.json"
    path.write_text("{not json")
    with pytest.raises(ExportFolderError, match="export.json is not valid JSON"):
        load_exported(folder)
    path.write_text("[1, 2]")
    with pytest.raises(ExportFolderError, match="export.json: must hold a JSON object, got list"):
        load_exported(folder)
    with open(path, "wb") as handle:
        handle.truncate(9 * 2**20)  # sparse: the size is refused before a byte is read
    with pytest.raises(ExportFolderError, match=r"export.json is 9437184 bytes, more than any export description"):
        load_exported(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs symlinks and fifos (POSIX)")
def test_the_graph_must_be_a_regular_file_inside_the_folder(folder, tmp_path):
    graph = folder / "model.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.move(graph, outside)
    graph.symlink_to(outside)
    with pytest.raises(ExportFolderError, match="model.onnx is a symlink leading out of the folder"):
        load_exported(folder)
    graph.unlink()
    shutil.move(outside, folder / "kept.onnx")
    graph.symlink_to("kept.onnx")  # a symlink that stays inside the folder is a file of the folder
    load_exported(folder)
    graph.unlink()
    os.mkfifo(graph)  # opening a fifo would block forever
    with pytest.raises(ExportFolderError, match="model.onnx is not a regular file"):
        load_exported(folder)
    graph.unlink()
    graph.mkdir()
    with pytest.raises(ExportFolderError, match="model.onnx is not a regular file"):
        load_exported(folder)
    graph.rmdir()
    with pytest.raises(FileNotFoundError, match="holds no model.onnx"):
        load_exported(folder)
    description = folder / "export.json"
    shutil.move(description, tmp_path / "elsewhere.json")
    description.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ExportFolderError, match="export.json is a symlink leading out of the folder"):
        load_exported(folder)


def test_a_folder_exported_before_checksums_loads_with_a_warning(folder):
    def legacy(description):
        del description["sha256"]
        del description["model"]["vocab_size"]

    edit_description(folder, legacy)
    with pytest.warns(UserWarning, match=r"exported before SHA-256 checksums.*cannot be verified.*token ids are not "
                                         r"range-checked.*Re-export"):
        runner = load_exported(folder)
    runner.step(torch.tensor([1, 2]), runner.initial_state(2))
    with open(folder / "model.onnx", "ab") as handle:
        handle.write(b"\0")  # the recorded size is still checked
    with pytest.raises(ExportFolderError, match="bytes but export.json records"):
        load_exported(folder)


def test_the_onnx_step_refuses_token_ids_outside_the_vocabulary(exported):
    runner = load_exported(exported / "a")
    state = runner.initial_state(2)
    runner.step(torch.tensor([0, VOCAB - 1]), state)
    for ids in ([-1, 3], [2, VOCAB]):  # -1 used to wrap to id 15 inside the graph
        with pytest.raises(ValueError, match=rf"token ids outside the vocabulary \[0, {VOCAB}\).*min {min(ids)}, "
                                             rf"max {max(ids)}"):
            runner.step(torch.tensor(ids), state)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.step(torch.tensor([-1, 3]).numpy(), state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_onnx_export_refuses_float64_and_bfloat16_up_front(tmp_path, dtype):
    model = token_classifier(3).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"ONNX export needs a float32 \(or float16\) model: this one holds {name} "
                                         r"tensors .*`model.float\(\)`"):
        export_model(model, tmp_path / "out", format="onnx")
    assert os.listdir(tmp_path) == []
    assert next(model.parameters()).dtype == dtype  # the user's model is left as it was


def test_a_real_folder_exported_before_this_change_still_loads_with_a_warning():
    """tests/fixtures/legacy_export: written by the previous exporter (no sha256, no vocab_size) from
    a seed-0 token classifier (vocab 16, d_model 4, 1 layer, d_state 2) whose logits after the tokens
    1, 5, 15, 0, 3 were [0.0107975, 0.0114027]."""
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_export")
    assert "sha256" not in json.loads(open(os.path.join(folder, "export.json"), encoding="utf-8").read())
    with pytest.warns(UserWarning, match="exported before SHA-256 checksums"):
        runner = load_exported(folder)
    outputs = runner.run(torch.tensor([[1], [5], [15], [0], [3]]))
    torch.testing.assert_close(outputs[-1], torch.tensor([[0.0107975, 0.0114027]]), rtol=1e-4, atol=1e-6)


def test_an_executorch_program_is_given_to_the_runtime_as_verified_bytes_with_full_verification(
        folder, tmp_path, monkeypatch):
    """No executorch here (a separate extra): a stand-in runtime records how the program is loaded."""
    import sys
    import types

    calls = []

    class Runtime:
        @staticmethod
        def get():
            return Runtime()

        def load_program(self, data, *, verification):
            calls.append((data, verification))
            return types.SimpleNamespace(load_method=lambda name: name)

    runtime = types.ModuleType("executorch.runtime")
    runtime.Runtime, runtime.Verification = Runtime, types.SimpleNamespace(InternalConsistency="full")
    monkeypatch.setitem(sys.modules, "executorch", types.ModuleType("executorch"))
    monkeypatch.setitem(sys.modules, "executorch.runtime", runtime)
    program = b"not really a program"
    (folder / "model.pte").write_bytes(program)

    def as_executorch(description):
        description.update(format="executorch", graph="model.pte", file_bytes={"model.pte": len(program)},
                           sha256={"model.pte": hashlib.sha256(program).hexdigest()})

    edit_description(folder, as_executorch)
    load_exported(folder)  # no trust_pickle needed: a FlatBuffers program, no unpickling
    assert calls == [(program, "full")]
    (folder / "model.pte").write_bytes(program.upper())
    with pytest.raises(ExportFolderError, match="SHA-256"):
        load_exported(folder)
    assert len(calls) == 1
