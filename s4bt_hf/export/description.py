"""export.json, the description of an exported folder: its schema, checked field by field before
anything in it is used, and the files it names, checked before a runtime reads them.

A folder is only trusted as far as export.json and its own files agree: the graph must be the
plain file the format writes (no path, no symlink leading out, no device or fifo), of the size and
SHA-256 recorded at export. This catches a graph swapped or damaged after export; it does not
authenticate a folder (whoever can replace the graph can rewrite export.json), which is why a
`.pt2` program, which `torch.export.load` unpickles, also needs `trust_pickle=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings

from .exporter import DESCRIPTION_FILE, EXPORT_FORMATS, GRAPH_FILES, INT8_FILE

EXPORT_MODES = ("streaming", "whole_sequence")
MAX_DESCRIPTION_BYTES = 8 * 2**20  # a description is a few kB per layer; anything larger is not ours
TENSOR_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ExportFolderError(ValueError):
    """An exported folder that does not hold what its export.json says (or whose export.json is malformed)."""


def _field_error(source: str, field: str, wanted: str, value) -> ExportFolderError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ExportFolderError(f"{source}: field `{field}` must be {wanted}, got {shown}. Re-export the model with "
                             "`export_model` (`s4bt export`) rather than editing export.json.")


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_tensor_entries(description: dict, key: str, source: str, batch_first: str, length: bool = False) -> None:
    """Every entry of `key` names a tensor: shape [batch, sizes...], or with `length` (a
    whole-sequence graph) [batch, "length" or a size, sizes...]."""
    entries = description[key]
    if not isinstance(entries, list) or not entries:
        raise _field_error(source, key, "a non-empty list of tensor entries", entries)
    names = set()
    for index, entry in enumerate(entries):
        field = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise _field_error(source, field, "an object with name, shape, dtype and meaning", entry)
        for name, kind in (("name", str), ("meaning", str), ("dtype", str), ("shape", list)):
            if not isinstance(entry.get(name), kind):
                raise _field_error(source, f"{field}.{name}", f"a {kind.__name__}", entry.get(name))
        if entry["name"] in names:
            raise _field_error(source, f"{field}.name", "a name used once", entry["name"])
        names.add(entry["name"])
        if entry["dtype"] not in TENSOR_DTYPES:
            raise _field_error(source, f"{field}.dtype", f"one of {', '.join(TENSOR_DTYPES)}", entry["dtype"])
        shape = entry["shape"]
        sizes = [n for index, n in enumerate(shape[1:]) if not (length and index == 0 and n == "length")]
        if not shape or not (shape[0] == "batch" or _is_int(shape[0], 1)) or not all(_is_int(n) for n in sizes):
            wanted = f'[{batch_first}, "length" or a size, sizes...]' if length else f"[{batch_first}, sizes...]"
            raise _field_error(source, f"{field}.shape", f"{wanted} of non-negative ints", shape)


def _check_file_table(description: dict, key: str, source: str, value_ok, wanted: str, needed) -> None:
    table = description[key]
    if not isinstance(table, dict):
        raise _field_error(source, key, "an object mapping file names to " + wanted, table)
    for name, value in table.items():
        if not _is_plain_name(name):
            raise _field_error(source, f"{key} (a key)", "a file name without a path", name)
        if not value_ok(value):
            raise _field_error(source, f"{key}[{name!r}]", wanted, value)
    for name in needed:
        if name not in table:
            raise _field_error(source, key, f"an entry for {name}", sorted(table))


def _is_plain_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and (os.altsep is None or os.altsep not in name))


def validate_description(description, source: str) -> None:
    """Check every field the loader reads (types, allowed values, file names) and raise ONE
    ExportFolderError naming `source` (the export.json path) and the field. `sha256` (and, for a
    token model, `model.vocab_size`) are absent only from folders exported before they were recorded."""
    if not isinstance(description, dict):
        raise ExportFolderError(f"{source}: must hold a JSON object, got {type(description).__name__}.")
    required = ("format", "graph", "int8_graph", "inputs", "outputs", "model", "file_bytes")
    for key in required:
        if key not in description:
            raise ExportFolderError(f"{source}: the required field `{key}` is missing. Re-export the model with "
                                    "`export_model` (`s4bt export`).")
    format = description["format"]
    if format not in EXPORT_FORMATS:
        raise _field_error(source, "format", f"one of {', '.join(EXPORT_FORMATS)}", format)
    if description["graph"] != GRAPH_FILES[format]:
        raise _field_error(source, "graph", f"{GRAPH_FILES[format]!r} (the file of format {format!r})",
                           description["graph"])
    mode = description.get("mode", "streaming")  # absent from folders exported before whole sequences
    if mode not in EXPORT_MODES:
        raise _field_error(source, "mode", f"one of {', '.join(EXPORT_MODES)}", mode)
    whole_sequence = mode == "whole_sequence"
    if whole_sequence and format not in ("onnx", "torch"):
        raise _field_error(source, "format", "'onnx' or 'torch' (a whole-sequence graph)", format)
    int8_graph = description["int8_graph"]
    if int8_graph is not None and (format != "onnx" or whole_sequence or int8_graph != INT8_FILE):
        raise _field_error(source, "int8_graph", f"null or {INT8_FILE!r} (ONNX streaming step only)", int8_graph)
    batch_first = "1" if format == "executorch" else '"batch"'
    _check_tensor_entries(description, "inputs", source, batch_first, whole_sequence)
    _check_tensor_entries(description, "outputs", source, batch_first, whole_sequence)
    if description["inputs"][0]["name"] != "inputs":
        raise _field_error(source, "inputs[0].name", "'inputs' (the position's input comes first)",
                           description["inputs"][0]["name"])
    if whole_sequence:
        names = [entry["name"] for entry in description["inputs"]]
        if names != ["inputs", "attention_mask"]:
            raise _field_error(source, "inputs", "the entries 'inputs' and 'attention_mask' (a whole-sequence graph)",
                               names)
        for index, entry in enumerate(description["inputs"]):
            if entry["shape"][:2] != ["batch", "length"]:
                raise _field_error(source, f"inputs[{index}].shape", '["batch", "length", sizes...]', entry["shape"])
        if len(description["outputs"]) != 1:
            raise _field_error(source, "outputs", "one entry (a whole-sequence graph)",
                               [entry["name"] for entry in description["outputs"]])
    graphs = [description["graph"]] + ([int8_graph] if int8_graph else [])
    _check_file_table(description, "file_bytes", source, _is_int, "a size in bytes", graphs)
    if "sha256" in description:
        _check_file_table(description, "sha256", source,
                          lambda value: isinstance(value, str) and _SHA256.fullmatch(value) is not None,
                          "a SHA-256 (64 lowercase hex digits)", graphs)
    model = description["model"]
    if not isinstance(model, dict):
        raise _field_error(source, "model", "an object", model)
    if model.get("input") not in ("input_ids", "input_values"):
        raise _field_error(source, "model.input", "'input_ids' or 'input_values'", model.get("input"))
    if model["input"] == "input_ids" and ("sha256" in description or "vocab_size" in model):
        if not _is_int(model.get("vocab_size"), 1):
            raise _field_error(source, "model.vocab_size", "a positive int (the ids `inputs` may hold)",
                               model.get("vocab_size"))


def _regular_file_inside(folder: str, name: str, what: str) -> str:
    """The real path of `folder/name`, which must be a regular file inside `folder` (after symlinks)."""
    if not _is_plain_name(name):
        raise ExportFolderError(f"{what} {name!r} is not a plain file name inside {folder}.")
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{folder} holds no {name}, which {DESCRIPTION_FILE} names as its {what}.")
    real_folder, real = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise ExportFolderError(f"{path} is a symlink leading out of the folder (to {real}); refused.")
    try:
        mode = os.stat(real).st_mode
    except OSError as error:  # a dangling symlink, or a loop
        raise ExportFolderError(f"{path} cannot be read ({error.strerror}).") from error
    if not stat.S_ISREG(mode):
        raise ExportFolderError(f"{path} is not a regular file (a folder, device or fifo); refused.")
    return real


def _read_regular_file(path: str, shown: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, opened without following a last-moment symlink and
    without blocking (a fifo swapped in after the check is refused, not waited on)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags)
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ExportFolderError(f"{shown} is not a regular file; refused.")
        return handle.read(limit + 1)


def read_description(folder: str) -> dict:
    """Read and validate `folder`/export.json: a regular file inside the folder, at most
    MAX_DESCRIPTION_BYTES (checked before reading), valid JSON, then `validate_description`."""
    source = os.path.join(folder, DESCRIPTION_FILE)
    if not os.path.lexists(source):
        raise FileNotFoundError(f"{folder} holds no {DESCRIPTION_FILE}: not a folder written by `export_model`.")
    real = _regular_file_inside(folder, DESCRIPTION_FILE, "description")
    size = os.stat(real).st_size
    if size > MAX_DESCRIPTION_BYTES:
        raise ExportFolderError(f"{source} is {size} bytes, more than any export description "
                                f"({MAX_DESCRIPTION_BYTES} at most); refused without reading it.")
    data = _read_regular_file(real, source, MAX_DESCRIPTION_BYTES)
    if len(data) > MAX_DESCRIPTION_BYTES:
        raise ExportFolderError(f"{source} grew past {MAX_DESCRIPTION_BYTES} bytes while being read; refused.")
    try:
        description = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ExportFolderError(f"{source} is not valid JSON ({error}). Re-export the model.") from error
    validate_description(description, source)
    return description


def read_verified_graph(folder: str, description: dict, graph: str) -> bytes:
    """The bytes of `graph` (named by a validated description), after checking that it is a regular
    file inside `folder` whose size and SHA-256 are those recorded at export. The runtime is then
    given these bytes, not the path, so nothing can be swapped between the check and the load.
    A folder exported before checksums were recorded loads with a warning (see the report)."""
    real = _regular_file_inside(folder, graph, "graph")
    recorded = description["file_bytes"][graph]
    size = os.stat(real).st_size
    if size != recorded:
        raise ExportFolderError(f"{os.path.join(folder, graph)} is {size} bytes but {DESCRIPTION_FILE} records "
                                f"{recorded}: the file was changed or replaced after export; re-export the model.")
    data = _read_regular_file(real, os.path.join(folder, graph), recorded)
    if len(data) != recorded:
        raise ExportFolderError(f"{os.path.join(folder, graph)} changed size while being read; refused.")
    expected = description.get("sha256", {}).get(graph)
    if expected is None:
        unchecked_ids = description["model"]["input"] == "input_ids" and "vocab_size" not in description["model"]
        warnings.warn(
            f"{folder} was exported before SHA-256 checksums were recorded in {DESCRIPTION_FILE}: {graph} cannot "
            "be verified (only its size was checked)" + (" and token ids are not range-checked" if unchecked_ids
                                                         else "") + ". Re-export the model to get a verifiable folder.",
            stacklevel=4,  # the caller of load_exported
        )
    elif hashlib.sha256(data).hexdigest() != expected:
        raise ExportFolderError(f"{os.path.join(folder, graph)} does not match the SHA-256 recorded in "
                                f"{DESCRIPTION_FILE}: the file was changed or replaced after export; refused. "
                                "Re-export the model.")
    return data
