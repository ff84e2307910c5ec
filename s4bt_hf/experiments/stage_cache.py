"""The stage cache of `s4bt reproduce`: each stage's result in
`<run folder>/stages/<name>-<hash of its configuration>/result.json`, so that a re-run skips
finished stages.

A run folder can be moved or copied and resumed from its new place: the paths a result holds
(`PATH_FIELDS`: its stage folder, its model) are saved relative to the run folder and read back
against wherever the run folder is now. Results written before this rule held absolute paths;
those under a `stages/` folder are read back against the current run folder too. Stage keys that
name another stage's model hold its `StageCache.relative` path for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

STAGES_DIR = "stages"
PATH_FIELDS = ("folder", "model")  # the paths in a stage result


class StageCache:
    """Stage results keyed by a hash of their configuration, under `<output>/stages`."""

    def __init__(self, output: str):
        self.output = os.path.abspath(output)
        self.root = os.path.join(self.output, STAGES_DIR)

    def folder(self, name: str, config: dict) -> str:
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return os.path.join(self.root, f"{name}-{key}")

    def relative(self, path: str) -> str:
        """`path` relative to the run folder when it lies inside it (what a stage key holds)."""
        path = os.path.abspath(path)
        if os.path.commonpath([path, self.output]) != self.output:
            return path
        return os.path.relpath(path, self.output).replace(os.sep, "/")

    def run(self, name: str, config: dict, work, log) -> dict:
        """The stage's result, read back if it finished before, else computed by `work(folder)`
        and saved (with its paths relative to the run folder). Paths returned are absolute."""
        folder = self.folder(name, config)
        result_path = os.path.join(folder, "result.json")
        if os.path.exists(result_path):
            result = self.with_absolute_paths(read_result(result_path))
            log(f"{name}: done before, skipped")
            return result
        os.makedirs(folder, exist_ok=True)
        config_path = os.path.join(folder, "stage_config.json")  # written for the reader; never read back
        _write_json(config_path, config)
        started = time.time()
        result = {**work(folder), "seconds": round(time.time() - started, 2), "folder": folder}
        _write_json(result_path, {key: self.relative(value) if key in PATH_FIELDS and isinstance(value, str)
                                  else value for key, value in result.items()})
        log(f"{name}: {_short(result)}")
        return result

    def with_absolute_paths(self, result: dict) -> dict:
        """`result` as `run` returns it: its `PATH_FIELDS` resolved against this run folder."""
        return {key: self._resolve(value) if key in PATH_FIELDS and isinstance(value, str) else value
                for key, value in result.items()}

    def _resolve(self, path: str) -> str:
        if not os.path.isabs(path):
            return os.path.normpath(os.path.join(self.output, path))
        marker = f"{os.sep}{STAGES_DIR}{os.sep}"  # an absolute path of a result written before the rule
        if marker in path:
            return os.path.join(self.root, path.rsplit(marker, 1)[1])
        return path


def read_result(path: str) -> dict:
    """A finished stage's result.json as saved; a ValueError naming it if it cannot be read (the
    stage is not redone silently: its folder may hold a finished training run that would be refused)."""
    try:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {' '.join(str(error).split())}); delete "
                         f"its stage folder {os.path.dirname(path)} to run that stage again") from error
    if not isinstance(result, dict):
        raise ValueError(f"{path} is not a stage result (a JSON object); delete its stage folder "
                         f"{os.path.dirname(path)} to run that stage again")
    return result


def read_stage_result(stage_folder: str) -> dict:
    """The result of a finished stage folder (`<run>/stages/<stage>`), paths absolute: for readers
    of a run folder other than `reproduce` (`s4bt compare-reductions`)."""
    cache = StageCache(os.path.dirname(os.path.dirname(os.path.abspath(stage_folder))))
    return cache.with_absolute_paths(read_result(os.path.join(stage_folder, "result.json")))


def _write_json(path: str, content: dict) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _short(result: dict) -> str:
    parts = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
             for key, value in result.items() if key in ("test_accuracy", "validation_accuracy", "seconds")]
    return ", ".join(parts)
