"""Run folders, checkpoints and output files under hostile or unlucky conditions: no pickle of a
run folder is ever executed, one writer per run folder, results written through a staging folder,
and every broken or unwritable file named in one line (issue 18, items 2a, 4, 5, part of 6)."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_child import toy_dataset

import s4bt_hf
from s4bt_hf.cli import main
from s4bt_hf.safe_io import hold_folder, staged_folder
from s4bt_hf.safe_io.folder_lock import is_held
from s4bt_hf.training import (
    RunFolderError,
    RunWriteError,
    S4DSSTrainer,
    TrainingConfig,
    latest_checkpoint,
    train,
)

TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "8", "--train-samples", "64", "--batch-size", "32",
        "--no-progress"]
CLI = "import sys; from s4bt_hf.cli import main; sys.exit(main(sys.argv[1:]))"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class CreatesMarker:
    """Unpickling this creates the folder `path`: the proof that a pickle's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def plant_pickle(path, marker):
    torch.save({"step": 99, "payload": CreatesMarker(marker)}, path)


def tiny_model():
    torch.manual_seed(0)
    return s4bt_hf.S4DSSForSequenceClassification(s4bt_hf.S4DSSConfig(d_model=8, n_layers=1, d_state=4, num_labels=2))


def config(output_dir, **changes):
    # 4 steps (64 samples, batch 16), checkpoints after steps 1, 2 and 3 (the newest two kept)
    fields = dict(output_dir=str(output_dir), num_epochs=1, batch_size=16, save_every=1, eval_every=2,
                  log_every=1, progress=False)
    return TrainingConfig(**{**fields, **changes})


DATA = toy_dataset(64, seed=5)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run: its final weights, and a copy of its folder as if killed after step 3."""
    folder = tmp_path_factory.mktemp("safety") / "run"
    train(tiny_model(), DATA, DATA, config(folder))
    return folder


def interrupted_copy(finished_run, target):
    """The finished run without final/: a resume starts from checkpoint step_3 (step_2 is the older one)."""
    shutil.copytree(finished_run, target)
    shutil.rmtree(target / "final")
    return target


def resume(folder):
    model = tiny_model()
    return model, train(model, DATA, DATA, config(folder))


def same_final_weights(first, second):
    left, right = (load_file(folder / "final" / "model.safetensors") for folder in (first, second))
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


# --- item 2a: nothing in a run folder is unpickled with code -----------------------------------------


def test_checkpoints_hold_no_pickle_of_the_trainer_state(finished_run):
    checkpoint = Path(latest_checkpoint(str(finished_run)))
    assert checkpoint.name == "step_3" and not list(checkpoint.glob("custom_checkpoint_*"))
    progress = json.loads((checkpoint / "trainer_progress.json").read_text())
    assert progress["step"] == 3 and progress["best_step"] == 2 and progress["skipped_batches"] == 0


def test_a_planted_custom_checkpoint_pickle_is_never_run(finished_run, tmp_path):
    """A `custom_checkpoint_0.pkl` planted in a checkpoint of today's format is not ours: ignored
    (Accelerate, which would unpickle it with weights_only=False, never sees it)."""
    folder = interrupted_copy(finished_run, tmp_path / "run")
    plant_pickle(folder / "checkpoints" / "step_3" / "custom_checkpoint_0.pkl", tmp_path / "pwned")
    _, result = resume(folder)
    assert not (tmp_path / "pwned").exists()
    assert result.resumed_from == 3 and same_final_weights(finished_run, folder)


def test_a_crafted_legacy_progress_pickle_is_refused_and_the_older_checkpoint_used(finished_run, tmp_path, caplog):
    """A checkpoint in the earlier format (progress pickled by Accelerate) is read with
    weights_only=True: a crafted pickle fails to load (no code runs), the checkpoint is skipped
    with a warning naming the file, the run resumes from the older one to the same weights."""
    folder = interrupted_copy(finished_run, tmp_path / "run")
    step_3 = folder / "checkpoints" / "step_3"
    (step_3 / "trainer_progress.json").write_text('{"step": 3}')  # the earlier format's marker
    plant_pickle(step_3 / "custom_checkpoint_0.pkl", tmp_path / "pwned")
    with caplog.at_level(logging.WARNING):
        _, result = resume(folder)
    assert not (tmp_path / "pwned").exists()
    assert result.resumed_from == 2 and same_final_weights(finished_run, folder)
    assert str(step_3 / "custom_checkpoint_0.pkl") in caplog.text and "step_2" in caplog.text


def test_a_crafted_random_states_pickle_is_never_run(finished_run, tmp_path, caplog):
    """Accelerate's own pickles: in this accelerate version `accelerate.utils.load` defaults to
    weights_only=True (checked directly), and the resume skips the checkpoint, naming the file."""
    from accelerate.utils import load as accelerate_load

    crafted = tmp_path / "random_states_0.pkl"
    plant_pickle(crafted, tmp_path / "pwned-directly")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        accelerate_load(crafted)
    assert not (tmp_path / "pwned-directly").exists()

    folder = interrupted_copy(finished_run, tmp_path / "run")
    plant_pickle(folder / "checkpoints" / "step_3" / "random_states_0.pkl", tmp_path / "pwned")
    with caplog.at_level(logging.WARNING):
        _, result = resume(folder)
    assert not (tmp_path / "pwned").exists()
    assert result.resumed_from == 2 and "random_states_0.pkl" in caplog.text


def test_every_torch_load_of_the_package_is_weights_only():
    package = Path(s4bt_hf.__file__).parent
    calls = [(path, line) for path in package.rglob("*.py") for line in path.read_text().splitlines()
             if "torch.load(" in line]
    assert calls, "the scan found nothing: the test would pass vacuously"
    assert all("weights_only=True" in line for _, line in calls), calls


# --- item 5: a broken file of the latest checkpoint: the newest intact one, said so ---------------


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "model.safetensors": truncate,
    "optimizer.bin": truncate,
    "scheduler.bin": lambda path: path.write_bytes(b"not a torch file"),
    "trainer_progress.json": lambda path: path.write_text('{"step": 3, "best_accuracy": '),
    "reduction.json": lambda path: path.write_text("{broken"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_broken_file_in_the_latest_checkpoint_falls_back_to_the_newest_intact_one(finished_run, tmp_path, name,
                                                                                    caplog):
    folder = interrupted_copy(finished_run, tmp_path / "run")
    BREAKAGES[name](folder / "checkpoints" / "step_3" / name)
    with caplog.at_level(logging.WARNING):
        _, result = resume(folder)
    assert result.resumed_from == 2
    assert str(folder / "checkpoints" / "step_3" / name) in caplog.text and "step_2" in caplog.text
    assert same_final_weights(finished_run, folder)


def test_no_intact_checkpoint_left_is_one_error_naming_the_files(finished_run, tmp_path):
    folder = interrupted_copy(finished_run, tmp_path / "run")
    for step in (2, 3):
        truncate(folder / "checkpoints" / f"step_{step}" / "optimizer.bin")
    with pytest.raises(RunFolderError, match="no intact checkpoint") as error:
        resume(folder)
    assert all(str(folder / "checkpoints" / f"step_{step}" / "optimizer.bin") in str(error.value) for step in (2, 3))
    assert not (folder / "final").exists()


def test_a_corrupt_run_config_is_named(finished_run, tmp_path, capsys):
    folder = interrupted_copy(finished_run, tmp_path / "run")
    (folder / "run_config.json").write_text('{"training": {')
    with pytest.raises(RunFolderError, match="run_config.json"):
        resume(folder)
    assert (folder / "run_config.json").read_text() == '{"training": {'  # left as it was


def test_a_corrupt_metric_log_line_is_named_and_a_cut_last_line_dropped(finished_run, tmp_path, caplog):
    folder = interrupted_copy(finished_run, tmp_path / "run")
    log = folder / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl line 3 is not a metric record"):
        resume(folder)

    log.write_text("".join(lines) + '{"step": 4, "lo')  # a write cut short by a kill
    with caplog.at_level(logging.WARNING):
        resume(folder)
    assert "cut short" in caplog.text and same_final_weights(finished_run, folder)
    uninterrupted = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in uninterrupted]


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_last_one(finished_run, tmp_path, monkeypatch):
    from accelerate import Accelerator

    folder = interrupted_copy(finished_run, tmp_path / "run")
    shutil.rmtree(folder / "checkpoints" / "step_3")  # the resume starts at step 2; step 3's checkpoint fails

    def disk_full(self, output_dir, **_):
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "model.safetensors"))

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(RunWriteError, match=r"\.partial_step_3/model\.safetensors: No space left on device"):
        resume(folder)
    assert sorted(os.listdir(folder / "checkpoints")) == ["step_2"]  # the partial folder is gone
    monkeypatch.undo()
    _, result = resume(folder)  # the same command resumes once there is space
    assert result.resumed_from == 2 and same_final_weights(finished_run, folder)


# --- item 4: one writer per run folder -----------------------------------------------------------


def test_the_run_holds_the_folder_lock_while_it_trains(tmp_path):
    lock = tmp_path / "run" / ".lock"

    class Watching(torch.utils.data.Dataset):
        held = []

        def __len__(self):
            return len(DATA)

        def __getitem__(self, index):
            Watching.held.append(is_held(str(lock)))
            return DATA[index]

    train(tiny_model(), Watching(), None, config(tmp_path / "run"))
    assert Watching.held and all(Watching.held)
    assert not is_held(str(lock))  # released at the end


def test_a_second_writer_is_refused_and_a_killed_holder_releases_the_folder(tmp_path):
    """Two real processes: the holder locks the folder (as a running `s4bt train` does); a second
    `s4bt train` on it exits with status 2 and one line naming it; after `kill -9` of the holder
    the same command trains."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from s4bt_hf.safe_io import hold_folder\n"
         "with hold_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, env=ENV, stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = [sys.executable, "-c", CLI, "train", "--task", "smnist", "--output", str(folder), *TINY]
        refused = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert refused.stderr.strip().splitlines() == [
            f"s4bt train: error: {folder} is in use by another training run (it holds {folder / '.lock'}); wait for "
            "it to finish or choose another folder"]
        assert sorted(os.listdir(folder)) == [".lock"]  # nothing was written by the refused run
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    trained = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (folder / "final" / "run_summary.json").exists()


def test_a_second_train_call_in_the_python_api_is_refused(tmp_path):
    folder = tmp_path / "run"
    with hold_folder(str(folder)):
        with pytest.raises(RunFolderError, match="is in use by another training run"):
            train(tiny_model(), DATA, None, config(folder))
    assert sorted(os.listdir(folder)) == [".lock"]


def test_the_lock_file_is_not_created_in_a_foreign_folder(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a run folder"):
        train(tiny_model(), DATA, None, config(foreign))
    assert sorted(os.listdir(foreign)) == ["notes.txt"]


# --- item 4: staged writes (compress, export) -----------------------------------------------------


def stale_staging(parent, name, age_seconds=0):
    """The staging folder a kill -9 leaves: its lock file beside it, held by nobody."""
    stale = parent / f".s4bt-staging-{name}-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    (parent / f"{stale.name}.lock").write_text("")
    os.utime(stale, (time.time() - age_seconds,) * 2)
    return stale


def test_stale_staging_folders_are_removed_and_a_live_one_kept(tmp_path):
    stale = stale_staging(tmp_path, "out")
    other = stale_staging(tmp_path, "other-output")  # a killed write to another destination in the same folder
    young = tmp_path / ".s4bt-staging-young-abc"  # no lock file yet, just created: perhaps being set up
    young.mkdir()
    with staged_folder(tmp_path / "live") as live:
        with staged_folder(tmp_path / "out") as staging:
            Path(staging, "a.txt").write_text("done")
            assert Path(live).exists()
        assert not stale.exists() and not Path(f"{stale}.lock").exists() and not other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([young.name, "live", "out"])
    assert (tmp_path / "out" / "a.txt").read_text() == "done"


def test_a_staging_folder_held_by_a_live_process_is_kept(tmp_path):
    with staged_folder(tmp_path / "out") as staging:
        Path(staging, "part").write_text("x")
        code = ("import sys; from s4bt_hf.safe_io.staging import remove_stale_staging; "
                "print(remove_stale_staging(sys.argv[1]))")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                               env=ENV, timeout=120)
        assert other.stdout.strip() == "[]" and Path(staging, "part").exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "model"
    s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(input_dim=1, d_model=8, n_layers=1, d_state=4, num_labels=10)).save_pretrained(folder)
    return folder


def test_compress_is_staged_and_removes_a_killed_compress_leftover(saved_model, tmp_path, capsys):
    stale = stale_staging(tmp_path, "r2")
    assert main(["compress", "--model", str(saved_model), "--rank", "2", "--output", str(tmp_path / "r2")]) == 0
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["r2"]
    assert s4bt_hf.S4DSSForSequenceClassification.from_pretrained(tmp_path / "r2").config.d_state == 2


def test_a_compress_that_fails_to_write_leaves_nothing(saved_model, tmp_path, capsys, monkeypatch):
    def disk_full(self, folder, **_):
        Path(folder, "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "model.safetensors"))

    monkeypatch.setattr(s4bt_hf.S4DSSForSequenceClassification, "save_pretrained", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", str(saved_model), "--rank", "2", "--output", str(tmp_path / "r2")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"s4bt compress: error: cannot write the compressed model to {tmp_path / 'r2'}: No space left on device "
        "(the disk is full)"]
    assert os.listdir(tmp_path) == []


def test_export_uses_the_shared_staging_and_removes_a_killed_export_leftover(saved_model, tmp_path):
    from s4bt_hf.export import export_model

    stale = stale_staging(tmp_path, "exported")
    legacy = tmp_path / ".s4bt-export-abc123"  # an earlier version's export killed long ago (no lock file)
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600,) * 2)
    model = s4bt_hf.S4DSSForSequenceClassification.from_pretrained(saved_model).eval()
    export_model(model, tmp_path / "exported", format="torch")
    assert sorted(os.listdir(tmp_path)) == ["exported"]
    assert not stale.exists() and ".lock" not in os.listdir(tmp_path / "exported")


# --- item 5: an unwritable --output, for every subcommand, before the work -----------------------


def unwritable_commands(model, blocked):
    return {
        "train": ["train", "--task", "smnist", "--output", f"{blocked}/run", *TINY],
        "compress": ["compress", "--model", model, "--rank", "2", "--output", f"{blocked}/r2"],
        "compare-reductions": ["compare-reductions", "--model", model, "--task", "smnist", "--output",
                               f"{blocked}/compare"],
        "evaluate": ["evaluate", "--model", model, "--task", "smnist", "--no-progress", "--output",
                     f"{blocked}/metrics.json"],
        "export": ["export", "--model", model, "--format", "torch", "--output", f"{blocked}/exported"],
        "reproduce": ["reproduce", "--output", f"{blocked}/reproduce"],
    }


@pytest.mark.parametrize("how", ["under-a-file", "read-only-folder"])
def test_every_subcommand_refuses_an_unwritable_output_before_working(saved_model, tmp_path, capsys, monkeypatch,
                                                                      how):
    """'under-a-file': --output inside a regular file (unwritable even for root). 'read-only-folder':
    a folder where creating a file fails (simulated: the tests may run as root, for whom mode bits
    do not block)."""
    import tempfile

    import s4bt_hf.training.evaluation as evaluation

    if how == "under-a-file":
        blocked = tmp_path / "a-file"
        blocked.write_text("mine")
    else:
        blocked = tmp_path / "read-only"
        blocked.mkdir()
        real_mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == blocked:
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(evaluation, "evaluate_dataset", lambda *a, **k: pytest.fail("evaluated before checking"))
    failures = []
    for name, argv in unwritable_commands(str(saved_model), blocked).items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        expected = f"s4bt {name}: error: cannot write --output {blocked}/"
        if exit_info.value.code != 2 or len(lines) != 1 or not lines[0].startswith(expected):
            failures.append(f"{name}: exit {exit_info.value.code}: {lines}")
    assert not failures, "\n".join(failures)
    assert sorted(os.listdir(tmp_path)) == [blocked.name]


def test_a_full_disk_while_training_is_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    from s4bt_hf.training import accelerate_trainer

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            disk_full()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(accelerate_trainer, "open", failing_open, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "smnist", "--output", str(tmp_path / "run"), *TINY])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"s4bt train: error: cannot write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device (the disk "
        "is full)")


def limit_file_size(max_bytes):
    """For a child process: files larger than `max_bytes` cannot be written (EFBIG), the way a full
    disk refuses them, but only for that process."""
    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_the_real_writers_failures_are_recognised(tmp_path):
    """safetensors and torch.save do not raise OSError when a write fails (checked for real, in a
    process that may not write files over 20 kB)."""
    code = """if True:
        import sys, torch
        from safetensors.torch import save_file
        from s4bt_hf.safe_io import as_write_error, describe
        for name, write in (("safetensors", lambda path: save_file({"a": torch.zeros(100000)}, path)),
                            ("torch.save", lambda path: torch.save({"a": torch.zeros(100000)}, path)),
                            ("open", lambda path: open(path, "w").write("x" * 100000) and None),
                            ("other", lambda path: 1 / 0)):
            try:
                write(sys.argv[1] + name)
            except Exception as error:
                failure = as_write_error(error)
                print(name, type(error).__name__, None if failure is None else describe(failure))
    """
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big-")], capture_output=True, text=True,
                            env=ENV, timeout=120, preexec_fn=limit_file_size(20_000))
    assert result.stdout.splitlines() == [
        "safetensors SafetensorError File too large",
        "torch.save RuntimeError torch.save could not write the file (is the disk full?)",
        "open OSError File too large",
        "other ZeroDivisionError None",
    ], result.stderr[-2000:]


def test_a_real_failed_write_while_training_and_compressing_is_one_line(saved_model, tmp_path):
    """Real processes whose files may not exceed 64 kB: the first checkpoint of `s4bt train` cannot
    be written, nor the model of `s4bt compress`; each says so in one line, exit status 2."""
    model_flags = ["--d-model", "64", "--n-layers", "2", "--d-state", "64", "--train-samples", "64", "--batch-size",
                   "32", "--save-every", "1", "--no-progress"]
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-c", CLI, "train", "--task", "smnist", "--output", str(run),
                              *model_flags], capture_output=True, text=True, env=ENV, timeout=300,
                             stdin=subprocess.DEVNULL, preexec_fn=limit_file_size(64_000))
    assert trained.returncode == 2, trained.stderr[-3000:]
    assert trained.stderr.strip().splitlines() == [
        f"s4bt train: error: cannot write {run / 'checkpoints' / '.partial_step_1'}: File too large; the run folder "
        "keeps its last complete checkpoint, from which the same command resumes"]
    assert os.listdir(run / "checkpoints") == []  # the partial checkpoint is removed

    big = tmp_path / "big"
    s4bt_hf.S4DSSForSequenceClassification(
        s4bt_hf.S4DSSConfig(input_dim=1, d_model=64, n_layers=2, d_state=64, num_labels=10)).save_pretrained(big)
    compressed = subprocess.run([sys.executable, "-c", CLI, "compress", "--model", str(big), "--rank", "32",
                                 "--output", str(tmp_path / "r32")], capture_output=True, text=True, env=ENV,
                                timeout=300, stdin=subprocess.DEVNULL, preexec_fn=limit_file_size(64_000))
    assert compressed.returncode == 2, compressed.stderr[-3000:]
    assert compressed.stderr.strip().splitlines() == [
        f"s4bt compress: error: cannot write the compressed model to {tmp_path / 'r32'}: File too large"]
    assert sorted(os.listdir(tmp_path)) == ["big", "run"]


# --- reproduce's stage cache --------------------------------------------------------------------


def test_a_corrupt_stage_result_is_named(tmp_path):
    from s4bt_hf.experiments.reproduce import StageCache

    cache = StageCache(str(tmp_path))
    result = cache.run("pretrain", {"seed": 0}, lambda folder: {"test_accuracy": 0.5}, log=lambda _: None)
    result_path = Path(result["folder"]) / "result.json"
    assert json.loads((Path(result["folder"]) / "stage_config.json").read_text()) == {"seed": 0}
    result_path.write_text('{"test_accuracy": 0.')
    with pytest.raises(ValueError, match=f"{result_path} cannot be read") as error:
        cache.run("pretrain", {"seed": 0}, lambda folder: pytest.fail("redone"), log=lambda _: None)
    assert "delete its stage folder" in str(error.value)


# --- item 6 (part): the Hankel schedule without a Hankel weight ----------------------------------


def test_hankel_schedule_without_a_weight_is_refused(tmp_path, capsys):
    for changes in ({"hankel_every": 4}, {"hankel_reuse": True}):
        with pytest.raises(ValueError, match="hankel_weight"):
            TrainingConfig(output_dir="x", **changes)
        with pytest.raises(ValueError, match="hankel_weight"):
            S4DSSTrainer(model=tiny_model(), **changes)
    TrainingConfig(output_dir="x", hankel_weight=0.1, hankel_every=4, hankel_reuse=True)
    for flags in (["--hankel-every", "4"], ["--hankel-reuse"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--task", "smnist", "--output", str(tmp_path / "run"), *TINY, *flags])
        assert exit_info.value.code == 2
        assert "need --hankel-weight > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_an_earlier_version_with_an_inert_hankel_schedule_resumes(finished_run, tmp_path):
    """Earlier versions accepted hankel_every=4 with hankel_weight=0 (it did nothing): such a run
    still resumes under the defaults."""
    folder = interrupted_copy(finished_run, tmp_path / "run")
    saved = json.loads((folder / "run_config.json").read_text())
    saved["training"].update(hankel_every=4, hankel_reuse=True)
    (folder / "run_config.json").write_text(json.dumps(saved))
    _, result = resume(folder)
    assert result.resumed_from == 3 and same_final_weights(finished_run, folder)
