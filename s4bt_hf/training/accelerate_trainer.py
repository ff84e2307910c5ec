"""Training loop on `accelerate.Accelerator`: one CPU, one GPU, or many processes and machines
under `accelerate launch`, unchanged.

AdamW with the S4 parameter groups (`ssm_param_groups`), cosine schedule with linear warm-up,
gradient accumulation, gradient clipping, mixed precision, evaluation with `gather_for_metrics`,
the best model by validation accuracy, complete checkpoints every `save_every` steps with
automatic resume from the latest one, a JSON-lines metric log and a final `save_pretrained`.

Run folder (`output_dir`):
    run_config.json      the training and model configuration (a resume must match it)
    checkpoints/step_N/  `Accelerator.save_state` + trainer_progress.json (+ hankel_term.safetensors with
                         `hankel_reuse`, reduction.json after a scheduled reduction), written atomically
    metrics.jsonl        one JSON object per logged step / evaluation (main process)
    best/                `save_pretrained` of the model with the best validation metric
                         (`metric_for_best_model`: by default accuracy, the loss for regression,
                         F1 for multi-label classification)
    final/               `save_pretrained` of the last model, with `run_summary.json`
    .lock                held (flock) by the process writing the folder: one run per folder

The trainer's own state is written as JSON and safetensors, never pickled: resuming never runs code
from the folder. A checkpoint with a file that cannot be read is skipped for the newest intact one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from ..compression_report import CompressionReport
from ..safe_io import FolderBusyError, as_write_error, describe, hold_folder
from ..safe_io.folder_lock import LOCK_FILE
from .evaluation import evaluation_metrics
from .hankel_penalty import dss_kernels
from .hankel_term import HankelTerm
from .optimization import ssm_param_groups
from .reduction_schedule import ReductionSchedule, reduce_during_training, resize_dss_layers, swap_optimizer_parameters

RUN_CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "run_summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "trainer_progress.json"  # the trainer's progress, written last: it marks a checkpoint complete
_COMPLETE_MARKER = PROGRESS_FILE
HANKEL_STATE_FILE = "hankel_term.safetensors"  # the kept value and gradient of `HankelTerm` (hankel_reuse)
REDUCTION_FILE = "reduction.json"  # in a checkpoint written after a scheduled reduction
# earlier versions registered the progress (0) and the HankelTerm (1) with Accelerate, which pickles them
_LEGACY_STATE_FILE = "custom_checkpoint_{}.pkl"
_LEGACY_STATE_PATTERN = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# the files of `Accelerator.save_state` we check before resuming (random_states: the one of each process)
_ACCELERATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")

logger = logging.getLogger(__name__)


BEST_MODEL_METRICS = ("accuracy", "loss", "mse", "mae", "f1", "exact_match")
_LOWER_IS_BETTER = ("loss", "mse", "mae")


@dataclass
class TrainingConfig:
    """Settings of one run. Steps are optimizer steps (after gradient accumulation)."""

    output_dir: str
    learning_rate: float = 1e-2
    weight_decay: float = 0.01
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when set
    batch_size: int = 32  # per process
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no", "bf16", "fp16"
    eval_every: int | None = None  # None: at the end of every epoch
    save_every: int | None = None  # None: at the end of every epoch
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    cpu: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # caller's facts recorded in run_config.json (task, data options)
    on_nonfinite_loss: str = "stop"  # "stop": raise NonFiniteLossError; "skip": leave the micro-batch out
    # compression-aware training: loss + hankel_weight · hankel_penalty(model), the penalty evaluated every
    # `hankel_every` optimizer steps with weight hankel_weight · hankel_every (the same strength on average),
    # or with `hankel_reuse` weight hankel_weight and its last gradient applied in between (`HankelTerm`)
    hankel_weight: float = 0.0
    hankel_every: int = 1
    hankel_reuse: bool = False
    reduction: ReductionSchedule | None = None  # reduce every layer during training (also a dict of its fields)
    # what `best/` is chosen by: an evaluation metric ("accuracy", "loss", "mse", "mae", "f1",
    # "exact_match"); None: accuracy for single-label classification, the loss (the MSE) for
    # regression, F1 for multi-label classification. `greater_is_better` None: lower is better for
    # loss, mse and mae, higher for the others
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None

    def __post_init__(self):
        if not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(f"TrainingConfig: `output_dir` must be a path, got {self.output_dir!r}.")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_size"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1, or_none=True)
        _require_int("seed", self.seed, minimum=0)
        for name in ("learning_rate", "weight_decay", "warmup_ratio"):
            _require_real(name, getattr(self, name))
        if self.max_grad_norm is not None:
            _require_real("max_grad_norm", self.max_grad_norm)
            if not self.max_grad_norm > 0:
                raise ValueError(f"TrainingConfig: `max_grad_norm` must be positive or None, got {self.max_grad_norm}.")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainingConfig: `learning_rate` must be positive, got {self.learning_rate!r}.")
        _require_real("hankel_weight", self.hankel_weight)
        if self.hankel_weight < 0:
            raise ValueError(f"TrainingConfig: `hankel_weight` must be >= 0, got {self.hankel_weight}.")
        _require_int("hankel_every", self.hankel_every, minimum=1)
        if not isinstance(self.hankel_reuse, bool):
            raise TypeError(f"TrainingConfig: `hankel_reuse` must be True or False, got {self.hankel_reuse!r}.")
        if self.hankel_weight == 0 and (self.hankel_every != 1 or self.hankel_reuse):
            # refused, not ignored: without a weight they do nothing, so they most likely mean a forgotten weight
            raise ValueError("TrainingConfig: `hankel_every`/`hankel_reuse` schedule the Hankel penalty, which is off "
                             "(`hankel_weight` is 0); set `hankel_weight` > 0 or leave them at their defaults.")
        self.reduction = ReductionSchedule.coerce(self.reduction)
        if self.metric_for_best_model is not None and self.metric_for_best_model not in BEST_MODEL_METRICS:
            raise ValueError(f"TrainingConfig: `metric_for_best_model` must be one of {', '.join(BEST_MODEL_METRICS)} "
                             f"or None, got {self.metric_for_best_model!r}.")
        if self.greater_is_better is not None and not isinstance(self.greater_is_better, bool):
            raise TypeError(f"TrainingConfig: `greater_is_better` must be True, False or None, "
                            f"got {self.greater_is_better!r}.")
        if self.on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"TrainingConfig: `on_nonfinite_loss` must be 'stop' or 'skip', "
                             f"got {self.on_nonfinite_loss!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainingConfig: `warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"TrainingConfig: `weight_decay` must be >= 0, got {self.weight_decay!r}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"TrainingConfig: `mixed_precision` must be 'no', 'bf16' or 'fp16', "
                             f"got {self.mixed_precision!r}.")

    # fields that may change between a run and its resume without changing its result
    RESUMABLE_CHANGES = ("progress", "cpu", "keep_checkpoints", "log_every")


def _require_int(name: str, value, minimum: int, or_none: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"TrainingConfig: `{name}` must be an int{' or None' if or_none else ''}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"TrainingConfig: `{name}` must be >= {minimum}{' or None' if or_none else ''}, "
                         f"got {value}.")


def _require_real(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"TrainingConfig: `{name}` must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"TrainingConfig: `{name}` must be finite, got {value}.")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (finished run, other configuration, another
    run writing it, no intact checkpoint, a corrupt file)."""


class RunWriteError(OSError):
    """A file of the run could not be written (disk full, no permission); the message names it,
    `errno` and `filename` are the failed write's."""

    def __init__(self, message: str, errno_: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message, self.errno, self.filename = message, errno_, filename

    def __str__(self):
        return self.message


class CheckpointError(ValueError):
    """A file of a checkpoint cannot be read; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss (or non-finite weights to save) and stopped."""


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    best_accuracy: float | None
    best_step: int | None
    final_metrics: dict
    resumed_from: int | None
    skipped_batches: int = 0  # micro-batches left out for a non-finite loss (on_nonfinite_loss="skip")
    metric_for_best_model: str | None = None  # what best/ was chosen by, and its value there
    best_metric: float | None = None


class _Progress:
    """Trainer progress saved inside every checkpoint (`PROGRESS_FILE`, JSON)."""

    def __init__(self):
        self.step = 0
        self.best_accuracy = None  # the accuracy of best/ (classification), whatever chose it
        self.best_metric = None  # the value of `metric_for_best_model` of best/
        self.best_step = None
        self.skipped_batches = 0

    def state_dict(self):
        return {"step": self.step, "best_accuracy": self.best_accuracy, "best_step": self.best_step,
                "skipped_batches": self.skipped_batches, "best_metric": self.best_metric}

    def load_state_dict(self, state):
        self.step, self.best_accuracy, self.best_step = state["step"], state["best_accuracy"], state["best_step"]
        self.skipped_batches = state.get("skipped_batches", 0)  # absent in checkpoints of older versions
        # older versions chose best/ by accuracy only
        self.best_metric = state.get("best_metric", self.best_accuracy)

    @staticmethod
    def check(state, path: str) -> dict:
        """`state` if it is a progress record, else `CheckpointError` naming `path`."""
        number = (int, float, type(None))
        if not (isinstance(state, dict) and {"step", "best_accuracy", "best_step"} <= set(state)
                and type(state["step"]) is int and state["step"] >= 0
                and isinstance(state.get("best_accuracy"), number) and isinstance(state.get("best_step"), number)
                and type(state.get("skipped_batches", 0)) is int
                and isinstance(state.get("best_metric"), number)):
            raise CheckpointError(path, "not a trainer progress record")
        return state


def train(model, train_dataset, eval_dataset, config: TrainingConfig, collate_fn=None) -> TrainResult:
    """See `_train`. Afterwards the process-wide Accelerator state is cleared (the process group
    of a distributed launch stays), so one process can run several trainings with different
    mixed-precision settings (the paper's experiment does)."""
    try:
        return _train(model, train_dataset, eval_dataset, config, collate_fn)
    finally:
        AcceleratorState._reset_state()  # private, but the only way: the state is a singleton


@dataclass
class _Run:
    """Everything one training run holds while it runs (built by `_prepare_run`)."""

    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader | None
    progress: _Progress
    steps_per_epoch: int
    total_steps: int
    resumed_from: int | None = None
    last_metrics: dict = field(default_factory=dict)
    running_loss: float = 0.0
    running_count: int = 0
    started: float = field(default_factory=time.time)
    bar: object = None
    hankel: HankelTerm | None = None  # the penalty's term in the loss (None: no penalty)
    running_penalty: float = 0.0  # Σσ values (unweighted) since the last log record
    penalty_count: int = 0
    reduction_step: int | None = None  # the optimizer step after which the schedule reduces the model
    reduced_at: int | None = None


def _train(model, train_dataset, eval_dataset, config: TrainingConfig, collate_fn=None) -> TrainResult:
    """Train `model` (an S4-DSS model, trained in place; the run's weights are saved in
    `config.output_dir`) on `train_dataset`, evaluating on `eval_dataset` (or never, if None),
    and return a summary. Resumes automatically from the latest complete checkpoint of
    `config.output_dir` (the newest intact one, with a warning, if a file of it cannot be read);
    refuses (RunFolderError) a folder holding a finished run, a run of another configuration, or
    one another run is writing. `collate_fn` defaults to `PadCollator` (pads `input_ids`, stacks
    `input_values`). A file that cannot be written (full disk) raises RunWriteError naming it.

    A non-finite loss (NaN/Inf inputs, or a diverged model) stops the run with
    `NonFiniteLossError` (`config.on_nonfinite_loss="skip"` leaves such batches out instead), and
    `best/` and `final/` are never written from non-finite weights."""
    _check_datasets(train_dataset, eval_dataset)
    if collate_fn is None:
        collate_fn = _default_collator(model)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    _check_compression_options(model, config, _planned_total_steps(config, len(train_dataset), accelerator))
    run_config = {"training": _comparable(config), "model": model.config.to_dict()}
    with _one_writer(config.output_dir, accelerator):
        resume_dir = _prepare_run_folder(config.output_dir, run_config, accelerator)
        set_seed(config.seed)
        run = _prepare_run(accelerator, model, train_dataset, eval_dataset, config, collate_fn)
        if resume_dir is not None:
            _resume(run)
        run.bar = tqdm(total=run.total_steps, initial=run.progress.step, desc="train",
                       disable=not (config.progress and accelerator.is_local_main_process))
        try:
            _train_loop(run)
        finally:
            run.bar.close()
        return _finish(run)


@contextlib.contextmanager
def _one_writer(output_dir: str, accelerator):
    """Hold the run folder's lock (`safe_io.hold_folder`) for the run: a second run on the same
    folder is refused instead of deleting this one's checkpoints. Only the main process locks; the
    others learn the outcome from it, so all raise or all go on."""
    _refuse_foreign_folder(output_dir)  # before the lock file is created in it
    with contextlib.ExitStack() as stack:
        refusal = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(hold_folder(output_dir, "training run"))
            except FolderBusyError as error:
                refusal = str(error)
            except OSError as error:
                refusal = f"cannot create the run folder {output_dir}: {error.strerror or error}"
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise RunFolderError(refusal)
        yield


def _check_datasets(train_dataset, eval_dataset) -> None:
    if len(train_dataset) == 0:
        raise ValueError("train(): `train_dataset` is empty.")
    if eval_dataset is not None and len(eval_dataset) == 0:
        raise ValueError("train(): `eval_dataset` is empty: the best model cannot be chosen on 0 samples; pass "
                         "eval_dataset=None to train without evaluation.")


def _default_collator(model):
    from ..data.collate import PadCollator

    return PadCollator(getattr(model.config, "pad_token_id", None) or 0)


def _prepare_run(accelerator, model, train_dataset, eval_dataset, config: TrainingConfig, collate_fn) -> _Run:
    """Loaders, optimizer and schedule, prepared by the Accelerator."""
    # Loaders get generators of their own: creating an iterator would otherwise draw from the
    # global RNG (dropout's), and a resumed run creates its iterators at other times.
    train_loader = DataLoader(train_dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate_fn,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loader = None if eval_dataset is None else DataLoader(
        eval_dataset, batch_size=config.eval_batch_size or config.batch_size, shuffle=False, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.AdamW(ssm_param_groups(model, config.learning_rate, config.weight_decay))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    scheduler = accelerator.prepare(
        get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    )
    # the progress and the Hankel term are saved by `_save_checkpoint` itself (JSON, safetensors), not
    # registered with the Accelerator: it would pickle them, and unpickle a run folder's file on resume
    run = _Run(config, accelerator, model, optimizer, scheduler, train_loader, eval_loader, _Progress(),
               steps_per_epoch, total_steps)
    if config.hankel_weight > 0:
        run.hankel = HankelTerm(config.hankel_weight, config.hankel_every, config.hankel_reuse)
    if config.reduction is not None:
        run.reduction_step = config.reduction.step(total_steps)
    return run


def _planned_total_steps(config: TrainingConfig, num_samples: int, accelerator) -> int:
    """The run's optimizer steps, known before the loaders are built (as `_prepare_run` computes
    them: accelerate shards the batches evenly over the processes)."""
    if config.max_steps:
        return config.max_steps
    batches = math.ceil(math.ceil(num_samples / config.batch_size) / accelerator.num_processes)
    return config.num_epochs * math.ceil(batches / config.gradient_accumulation_steps)


def _check_compression_options(model, config: TrainingConfig, total_steps: int) -> None:
    """Errors of the Hankel penalty and the reduction schedule, before the run folder is touched."""
    if config.hankel_weight > 0 and not dss_kernels(model):
        raise TypeError(f"TrainingConfig: `hankel_weight` > 0 needs DSS layers; {type(model).__name__} has none.")
    if config.reduction is not None:
        config.reduction.check_model(model)
        config.reduction.step(total_steps)
        if AcceleratorState().num_processes > 1:
            raise ValueError("TrainingConfig: `reduction` during training runs in one process only (the "
                             "distributed wrapper holds the parameters it was built with).")


def _resume(run: _Run) -> None:
    """Load the newest intact checkpoint (`_intact_checkpoint`) into the run."""
    resume_dir, progress = _intact_checkpoint(run)
    reduction_file = os.path.join(resume_dir, REDUCTION_FILE)
    if os.path.exists(reduction_file):  # a checkpoint after the reduction: the model must have its shapes first
        saved = _read_json(reduction_file)
        model = run.accelerator.unwrap_model(run.model)
        swap_optimizer_parameters(run.optimizer, resize_dss_layers(model, saved["d_states"]))
        model.compression_report = CompressionReport.from_dict(saved["report"])
        run.reduced_at = saved["report"]["training"]["step"]
    try:
        with _without_legacy_state(resume_dir) as readable:
            run.accelerator.load_state(readable)
    except Exception as error:  # the files were readable (checked) but do not fit this run
        raise RunFolderError(f"cannot resume from {resume_dir}: {type(error).__name__}: {error}") from error
    run.progress.load_state_dict(progress)
    if run.hankel is not None and run.hankel.reuse:
        _load_hankel_state(run.hankel, resume_dir)
    run.resumed_from = run.progress.step
    _truncate_log(run.config.output_dir, run.progress.step, run.accelerator)


def _complete_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints (with their progress file), newest first."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = [int(name[5:]) for name in os.listdir(root) if re.fullmatch(r"step_\d+", name)
             and os.path.exists(os.path.join(root, name, _COMPLETE_MARKER))]
    return [os.path.join(root, f"step_{step}") for step in sorted(steps, reverse=True)]


def _intact_checkpoint(run: _Run) -> tuple[str, dict]:
    """The newest complete checkpoint whose files can all be read, and its progress record; the
    broken ones are skipped with a warning naming the bad file. RunFolderError if none is left."""
    accelerator, broken = run.accelerator, []
    for checkpoint in _complete_checkpoints(run.config.output_dir):
        try:
            progress = _check_checkpoint(checkpoint, run, accelerator.process_index)
        except CheckpointError as error:
            broken.append(error)
            progress = None
        if accelerator.num_processes > 1:  # every process resumes from the main process's choice
            progress = broadcast_object_list([progress])[0]
        if progress is not None:
            if broken and accelerator.is_main_process:
                logger.warning(f"resuming from {checkpoint}, the newest intact checkpoint; skipped "
                               + "; ".join(str(error) for error in broken))
            return checkpoint, progress
    raise RunFolderError(f"no intact checkpoint in {os.path.join(run.config.output_dir, CHECKPOINT_DIR)}: "
                         + "; ".join(str(error) for error in broken)
                         + ". Delete the broken checkpoint folders to start the run afresh.")


def _check_checkpoint(checkpoint: str, run: _Run, process_index: int) -> dict:
    """Read every file of `checkpoint` that a resume loads (nothing is unpickled: Accelerate's files
    through its `load`, which uses `torch.load(weights_only=True)`); returns the progress record.
    Raises CheckpointError naming the first file that cannot be read."""
    progress = _read_progress(checkpoint)
    if os.path.exists(os.path.join(checkpoint, REDUCTION_FILE)):
        saved = _read_json(os.path.join(checkpoint, REDUCTION_FILE))
        if not (isinstance(saved, dict) and isinstance(saved.get("d_states"), list)
                and isinstance(saved.get("report"), dict)):
            raise CheckpointError(os.path.join(checkpoint, REDUCTION_FILE), "not a reduction record")
    if run.hankel is not None and run.hankel.reuse:
        _read_hankel_state(checkpoint)
    for name in (*_ACCELERATE_FILES, f"random_states_{process_index}.pkl"):
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                load_file(path)
            else:
                accelerate_load(path, map_location="cpu")
        except Exception as error:  # missing, truncated, corrupt or unsafe (a pickle of code) files
            raise CheckpointError(path, _reason(error)) from error
    return progress


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    text = " ".join(str(error).split())
    return f"cannot be read ({type(error).__name__}: {text[:200]})"


def _read_json(path: str):
    """The JSON content of `path`; CheckpointError (a ValueError) naming it if unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(path, _reason(error)) from error


def _read_progress(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, PROGRESS_FILE)
    state = _read_json(path)
    if isinstance(state, dict) and "best_accuracy" not in state:  # an earlier version's: the progress was pickled
        path = os.path.join(checkpoint, _LEGACY_STATE_FILE.format(0))
        state = _load_legacy_state(path)
    return _Progress.check(state, path)


def _load_legacy_state(path: str):
    """A state an earlier version registered with Accelerate, read without running code from it
    (`weights_only=True`: tensors, numbers, strings, lists and dicts only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(path, _reason(error)) from error


def _read_hankel_state(checkpoint: str) -> dict | None:
    """The `HankelTerm.state_dict()` saved in `checkpoint`, or None when it kept nothing."""
    path = os.path.join(checkpoint, HANKEL_STATE_FILE)
    if os.path.exists(path):
        try:
            tensors = load_file(path)
            value = tensors.pop("value").item()
            gradients = [tensors.pop(f"gradient_{index}") for index in range(len(tensors))]
        except Exception as error:
            raise CheckpointError(path, _reason(error)) from error
        return {"value": value, "gradients": gradients}
    legacy = os.path.join(checkpoint, _LEGACY_STATE_FILE.format(1))
    if os.path.exists(legacy):
        state = _load_legacy_state(legacy)
        if not (isinstance(state, dict) and "value" in state and "gradients" in state):
            raise CheckpointError(legacy, "not a Hankel term state")
        return state
    return None


def _load_hankel_state(hankel: HankelTerm, checkpoint: str) -> None:
    state = _read_hankel_state(checkpoint)
    if state is None or state["value"] is None:
        hankel.clear()
    else:
        hankel.load_state_dict(state)


def _save_hankel_state(hankel: HankelTerm, folder: str) -> None:
    state = hankel.state_dict()
    if state["value"] is None:
        return
    tensors = {f"gradient_{index}": gradient.detach().cpu().contiguous()
               for index, gradient in enumerate(state["gradients"])}
    save_file({**tensors, "value": torch.tensor(state["value"], dtype=torch.float64)},
              os.path.join(folder, HANKEL_STATE_FILE))


@contextlib.contextmanager
def _without_legacy_state(checkpoint: str):
    """`checkpoint`, or, if it holds Accelerate's pickled custom states (an earlier version's, or
    planted), a temporary folder of links to its other files: `Accelerator.load_state` would unpickle
    those with weights_only=False (we read them ourselves, safely)."""
    names = os.listdir(checkpoint)
    if not any(_LEGACY_STATE_PATTERN.match(name) for name in names):
        yield checkpoint
        return
    view = tempfile.mkdtemp(prefix="s4bt-resume-")
    try:
        for name in names:
            if not _LEGACY_STATE_PATTERN.match(name):
                os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(view, name))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)  # the links only


def _train_loop(run: _Run) -> None:
    run.model.train()
    while run.progress.step < run.total_steps:
        epoch, done_in_epoch = divmod(run.progress.step, run.steps_per_epoch)
        run.train_loader.set_epoch(epoch)  # the shuffled order depends only on (seed, epoch)
        batches = run.accelerator.skip_first_batches(
            run.train_loader, done_in_epoch * run.config.gradient_accumulation_steps)
        for batch in batches:
            _training_step(run, batch)
            if not run.accelerator.sync_gradients:
                continue
            run.scheduler.step()
            run.progress.step += 1
            run.bar.update(1)
            if run.progress.step == run.reduction_step and run.reduced_at is None:
                _reduce(run)
            _after_optimizer_step(run)
            if run.progress.step >= run.total_steps:
                break


def _compute_loss(run: _Run, batch) -> torch.Tensor:
    """The loss of one micro-batch (the model's own loss)."""
    loss = run.model(**batch).loss
    if loss is None:  # the model computes a loss only from `labels`
        raise ValueError(f"a training batch has no `labels` (it has {', '.join(map(str, batch))}); name the label "
                         "column `labels` or `label` (the default collator reads both), or collate it as `labels`")
    return loss


def _training_step(run: _Run, batch) -> None:
    """Forward, backward and (at the end of an accumulation window) the optimizer step of one
    micro-batch; a non-finite loss stops the run or, with `on_nonfinite_loss="skip"`, leaves the
    micro-batch out (and the whole update, if it was the window's last micro-batch)."""
    accelerator, optimizer = run.accelerator, run.optimizer
    with accelerator.accumulate(run.model):
        loss = _compute_loss(run, batch)
        loss_value = loss.detach().float().item()  # one sync per micro-batch, as the running loss needs
        term, penalty_value = _hankel_term(run)
        if term is not None:
            # `accelerator.backward` divides by the accumulation steps; the term is added once per optimizer step
            loss = loss + (run.config.gradient_accumulation_steps * term).to(loss.dtype)
        # Σσ is checked when it is evaluated (a reused term holds that value): no host sync on the other steps
        if _nonfinite_anywhere(accelerator, loss_value if penalty_value is None else loss_value + penalty_value):
            _on_nonfinite_loss(run, loss_value)
            optimizer.zero_grad()  # acts at the window's end only: drops the unsynchronised partial sums
            return
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    run.running_loss += loss_value
    run.running_count += 1
    if penalty_value is not None:
        run.running_penalty += penalty_value
        run.penalty_count += 1


def _hankel_term(run: _Run) -> tuple[torch.Tensor | None, float | None]:
    """The weighted penalty term (`HankelTerm`) on the last micro-batch of an optimizer step, and
    Σσ when it was evaluated; (None, None) on the other micro-batches or without a penalty."""
    if run.hankel is None or not run.accelerator.sync_gradients:
        return None, None
    return run.hankel.loss_term(run.accelerator.unwrap_model(run.model), run.progress.step)


def _reduce(run: _Run) -> None:
    """The scheduled reduction, after optimizer step `progress.step`: the model is reduced in
    place, the optimizer gets the new parameters (fresh moments for them), the schedule goes
    on; `best/` restarts (the best model must be one of the reduced size)."""
    step = run.progress.step
    model = run.accelerator.unwrap_model(run.model)
    swap_optimizer_parameters(run.optimizer, reduce_during_training(model, run.config.reduction, step,
                                                                   run.total_steps))
    run.reduced_at = step
    run.progress.best_accuracy, run.progress.best_metric, run.progress.best_step = None, None, None
    if run.hankel is not None:
        run.hankel.clear()  # its kept gradient has the old shapes
    _log(run.config.output_dir, run.accelerator, {"step": step, "reduced_d_state": model.config.layer_d_states})


def _nonfinite_anywhere(accelerator, loss_value: float) -> bool:
    """Whether any process saw a non-finite loss (all processes must take the same branch)."""
    nonfinite = not math.isfinite(loss_value)
    if accelerator.num_processes == 1:
        return nonfinite
    flag = torch.tensor(float(nonfinite), device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _on_nonfinite_loss(run: _Run, loss_value: float) -> None:
    step = run.progress.step + 1
    if run.config.on_nonfinite_loss == "stop":
        raise NonFiniteLossError(
            f"training stopped at step {step}: the loss is {loss_value} (non-finite) on at least one process. "
            "The batch may hold NaN/Inf inputs, or the model diverged (try a lower learning rate); "
            f"{run.config.output_dir} keeps its last checkpoint and best/ model. Set on_nonfinite_loss='skip' to "
            "leave such batches out instead."
        )
    run.progress.skipped_batches += 1
    _log(run.config.output_dir, run.accelerator, {"step": step, "skipped_nonfinite_loss": loss_value})


def _after_optimizer_step(run: _Run) -> None:
    """Logging, evaluation (and the best model) and checkpoints after optimizer step `progress.step`."""
    config, step = run.config, run.progress.step
    if step % config.log_every == 0 or step == run.total_steps:
        _log_training_loss(run)
    if run.eval_loader is not None and (step % (config.eval_every or run.steps_per_epoch) == 0
                                        or step == run.total_steps):
        _evaluate_and_keep_best(run)
    if step % (config.save_every or run.steps_per_epoch) == 0 and step < run.total_steps:
        _save_checkpoint(run)


def _log_training_loss(run: _Run) -> None:
    if run.running_count == 0:  # every micro-batch since the last log was skipped
        return
    accelerator, step = run.accelerator, run.progress.step
    mean_loss = accelerator.gather(torch.tensor(run.running_loss / run.running_count, device=accelerator.device))
    record = {"step": step, "epoch": step / run.steps_per_epoch, "loss": round(mean_loss.mean().item(), 6)}
    postfix = {"loss": f"{mean_loss.mean().item():.4f}"}
    if run.penalty_count:  # the task loss above, the Hankel penalty (Σσ, unweighted) beside it
        record["hankel_penalty"] = round(run.running_penalty / run.penalty_count, 6)
        postfix["hankel"] = f"{record['hankel_penalty']:.4g}"
    _log(run.config.output_dir, accelerator, {
        **record, "learning_rate": run.scheduler.get_last_lr()[0], "seconds": round(time.time() - run.started, 3),
    })
    run.bar.set_postfix(postfix)
    run.running_loss, run.running_count = 0.0, 0
    run.running_penalty, run.penalty_count = 0.0, 0


def _evaluate_and_keep_best(run: _Run) -> None:
    step, progress = run.progress.step, run.progress
    run.last_metrics = evaluate_model(run.model, run.eval_loader, run.accelerator)
    _log(run.config.output_dir, run.accelerator,
         {"step": step, **{f"eval_{name}": value for name, value in run.last_metrics.items()}})
    name, greater = _best_model_metric(run.config, run.last_metrics)
    value = run.last_metrics[name]
    best = progress.best_metric
    if best is None or (value > best if greater else value < best):
        progress.best_metric, progress.best_step = value, step
        progress.best_accuracy = run.last_metrics.get("accuracy")
        _save_model(run.accelerator, run.model, os.path.join(run.config.output_dir, "best"))
    run.model.train()


def _best_model_metric(config: TrainingConfig, metrics: dict) -> tuple[str, bool]:
    """(metric name, whether greater is better) that chooses best/, by the config or by the
    metrics the problem type reports."""
    name = config.metric_for_best_model
    if name is None:
        name = "accuracy" if "accuracy" in metrics else "f1" if "f1" in metrics else "loss"
    if name not in metrics:
        reported = ", ".join(key for key in metrics if key != "samples")
        raise ValueError(f"TrainingConfig: `metric_for_best_model` is {name!r}, but the evaluation reports "
                         f"{reported} (the model's problem type decides which)")
    greater = config.greater_is_better if config.greater_is_better is not None else name not in _LOWER_IS_BETTER
    return name, greater


def _finish(run: _Run) -> TrainResult:
    """`final/` with `run_summary.json`."""
    accelerator, progress = run.accelerator, run.progress
    final_dir = os.path.join(run.config.output_dir, "final")
    _save_model(accelerator, run.model, final_dir)
    chosen_by = _best_model_metric(run.config, run.last_metrics)[0] if run.last_metrics else None
    result = TrainResult(run.config.output_dir, progress.step, progress.best_accuracy, progress.best_step,
                         run.last_metrics, run.resumed_from, progress.skipped_batches, chosen_by,
                         progress.best_metric)
    if accelerator.is_main_process:
        summary = os.path.join(final_dir, SUMMARY_FILE)
        with _writing(summary), open(summary, "w", encoding="utf-8") as handle:
            json.dump({**asdict(result), "num_processes": accelerator.num_processes}, handle, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def evaluate_model(model, loader, accelerator) -> dict:
    """Mean loss and accuracy over the whole evaluation set, gathered over all processes
    (`gather_for_metrics` drops the samples duplicated to fill the last batch)."""
    return evaluation_metrics(model, loader, gather=accelerator.gather_for_metrics,
                              config=accelerator.unwrap_model(model).config)


def _comparable(config: TrainingConfig) -> dict:
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in TrainingConfig.RESUMABLE_CHANGES}
    if values.get("reduction") is not None:
        values["reduction"] = values["reduction"].to_dict()
    return values


def _reduction_files(run: _Run) -> dict:
    """What a checkpoint after the reduction needs to be loaded into the original model: the
    reduced sizes and the compression report."""
    if run.reduced_at is None:
        return {}
    model = run.accelerator.unwrap_model(run.model)
    return {REDUCTION_FILE: {"d_states": model.config.layer_d_states, "report": model.compression_report.to_dict()}}


def _prepare_run_folder(output_dir: str, run_config: dict, accelerator) -> str | None:
    """Create the run folder, or check it for a resume. Returns the checkpoint to resume from."""
    summary = os.path.join(output_dir, "final", SUMMARY_FILE)
    if os.path.exists(summary):
        raise RunFolderError(f"{output_dir} already holds a finished run ({summary}); choose another output folder "
                             "or delete it.")
    config_path = os.path.join(output_dir, RUN_CONFIG_FILE)
    started = _has_started(output_dir)
    if os.path.exists(config_path) and not started:
        # a run that failed before its first checkpoint or saved model: nothing to keep, start afresh
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.remove(config_path)
            if os.path.exists(os.path.join(output_dir, METRICS_FILE)):
                os.remove(os.path.join(output_dir, METRICS_FILE))
        accelerator.wait_for_everyone()
    elif os.path.exists(config_path):
        try:
            saved = _read_json(config_path)
            if not isinstance(saved, dict) or not isinstance(saved.get("training", {}), dict):
                raise CheckpointError(config_path, "not a run configuration")
        except CheckpointError as error:
            raise RunFolderError(f"{error}; restore it, or choose another output folder") from error
        current = json.loads(json.dumps(run_config, default=str))
        differences = _differences(_inert_hankel_options(_with_defaults(saved)), _inert_hankel_options(current))
        if differences:
            raise RunFolderError(f"{output_dir} holds a run with another configuration; differing fields: "
                                 f"{', '.join(differences)}. Use another output folder or the same settings.")
    else:
        _refuse_foreign_folder(output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(config_path):
            os.makedirs(output_dir, exist_ok=True)
            if not os.path.exists(config_path):
                with open(config_path, "w", encoding="utf-8") as handle:
                    json.dump(run_config, handle, indent=2, default=str)
    accelerator.wait_for_everyone()
    return latest_checkpoint(output_dir)


def _refuse_foreign_folder(output_dir: str) -> None:
    """RunFolderError unless `output_dir` is new, empty (but for the lock file) or a run folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunFolderError(f"{output_dir} is a file, not a folder; choose a new folder for the run.")
    if os.path.isdir(output_dir) and not os.path.exists(os.path.join(output_dir, RUN_CONFIG_FILE)):
        if set(os.listdir(output_dir)) - {LOCK_FILE}:
            raise RunFolderError(f"{output_dir} exists and is not a run folder of this trainer (no "
                                 f"{RUN_CONFIG_FILE}); choose an empty or new folder.")


def _inert_hankel_options(run_config: dict) -> dict:
    """`hankel_every`/`hankel_reuse` at their defaults when `hankel_weight` is 0 (they do nothing then;
    earlier versions accepted other values, and such a run still resumes)."""
    training = run_config.get("training")
    if isinstance(training, dict) and training.get("hankel_weight") == 0:
        training.update(hankel_every=1, hankel_reuse=False)
    return run_config


def _has_started(output_dir: str) -> bool:
    """Whether the folder holds anything of a run worth keeping: a checkpoint or a saved model."""
    checkpoints = os.path.join(output_dir, CHECKPOINT_DIR)
    return (latest_checkpoint(output_dir) is not None or os.path.isdir(os.path.join(output_dir, "best"))
            or os.path.isdir(os.path.join(output_dir, "final"))
            or (os.path.isdir(checkpoints) and any(name.startswith("step_") for name in os.listdir(checkpoints))))


def _with_defaults(saved: dict) -> dict:
    """A saved run configuration with the defaults of fields added since it was written (a run
    started by an older version resumes if it used what are now the defaults)."""
    from ..configuration_s4dss import S4DSSConfig

    saved = json.loads(json.dumps(saved))
    training = saved.get("training", {})
    for option in fields(TrainingConfig):
        if option.name not in training and option.name not in TrainingConfig.RESUMABLE_CHANGES:
            if option.default is not MISSING:
                training[option.name] = option.default
    model = saved.get("model", {})
    for name in getattr(S4DSSConfig, "__annotations__", {}):
        if name not in model and hasattr(S4DSSConfig, name):
            model[name] = getattr(S4DSSConfig, name)
    return saved


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    found = []
    for key in keys:
        if key in ("transformers_version", "_name_or_path", "output_dir"):
            continue
        left, right = saved.get(key), current.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            found.append(f"{prefix}{key} ({left!r} -> {right!r})")
    return found


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or None (a resume may fall back to an older one
    if a file of it cannot be read)."""
    complete = _complete_checkpoints(output_dir)
    return complete[0] if complete else None


def _save_checkpoint(run: _Run) -> None:
    """`save_state`, the trainer's progress (JSON, written last: it marks the checkpoint complete),
    the Hankel term's kept gradient and the reduction record, into a temporary folder renamed into
    place, so a run killed mid-write never leaves a checkpoint that looks complete; keeps the
    newest `keep_checkpoints`. A full disk removes the partial folder and raises RunWriteError."""
    accelerator, config, step = run.accelerator, run.config, run.progress.step
    root = os.path.join(config.output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step_{step}")
    partial = os.path.join(root, f".partial_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        with _writing(root):
            os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        with _writing(partial):
            accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with _writing(partial):
                for name, content in _reduction_files(run).items():
                    _write_json(os.path.join(partial, name), content)
                if run.hankel is not None and run.hankel.reuse:
                    _save_hankel_state(run.hankel, partial)
                _write_json(os.path.join(partial, PROGRESS_FILE), run.progress.state_dict())
    except RunWriteError:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # what it holds is useless, and takes the space
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        steps = sorted(int(name.split("_")[1]) for name in os.listdir(root) if re.fullmatch(r"step_\d+", name))
        for old in steps[: -config.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_json(path: str, content) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)


@contextlib.contextmanager
def _writing(path: str):
    """Turn a failed write under `path` (full disk, no permission; `safe_io.as_write_error`) into
    RunWriteError naming the file."""
    try:
        yield
    except RunWriteError:
        raise
    except Exception as error:
        failure = as_write_error(error)
        if failure is None:
            raise
        where = failure.filename or path
        raise RunWriteError(f"cannot write {where}: {describe(failure)}; the run folder keeps its last complete "
                            "checkpoint, from which the same command resumes", failure.errno, where) from error


def _save_model(accelerator, model, directory: str) -> None:
    """`save_pretrained` of the unwrapped model; refuses non-finite weights (`best/` and `final/`
    only ever hold usable models)."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    bad = [name for name, tensor in unwrapped.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteLossError(f"not saving {directory}: the weights hold NaN/Inf ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}); the run diverged.")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar on every save
    try:
        with _writing(directory):
            unwrapped.save_pretrained(directory, is_main_process=accelerator.is_main_process)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    accelerator.wait_for_everyone()


def _log(output_dir: str, accelerator, record: dict) -> None:
    if accelerator.is_main_process:
        path = os.path.join(output_dir, METRICS_FILE)
        with _writing(path), open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_log(output_dir: str, step: int, accelerator) -> None:
    """Drop log records written after the checkpoint we resume from (they will be redone). A last
    line cut short (a kill while it was written) is dropped with a warning; any other line that is
    not a JSON record is an error naming the file and line (the log is left as it is)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if accelerator.is_main_process and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().split("\n")
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = record["step"]
                if not isinstance(record_step, (int, float)):
                    raise TypeError(f"step {record_step!r}")
            except (ValueError, KeyError, TypeError) as error:
                if number == len(lines):  # no newline after it: its write was cut short
                    logger.warning(f"{path}: dropped the last line {number}, cut short ({_reason(error)})")
                    continue
                raise RunFolderError(f"{path} line {number} is not a metric record ({_reason(error)}); fix or "
                                     "delete that line to resume") from error
            if record_step <= step:
                kept.append(line + "\n")
        with _writing(path):
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                handle.writelines(kept)
            os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()
