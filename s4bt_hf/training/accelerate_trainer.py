"""Training loop on `accelerate.Accelerator`: one CPU, one GPU, or many processes and machines
under `accelerate launch`, unchanged.

AdamW with the S4 parameter groups (`ssm_param_groups`), cosine schedule with linear warm-up,
gradient accumulation, gradient clipping, mixed precision, evaluation with `gather_for_metrics`,
the best model by validation accuracy, complete checkpoints every `save_every` steps with
automatic resume from the latest one, a JSON-lines metric log and a final `save_pretrained`.

Run folder (`output_dir`):
    run_config.json      the training and model configuration (a resume must match it)
    checkpoints/step_N/  `Accelerator.save_state` + trainer progress, written atomically
    metrics.jsonl        one JSON object per logged step / evaluation (main process)
    best/                `save_pretrained` of the model with the best validation accuracy
    final/               `save_pretrained` of the last model, with `run_summary.json`
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from ..optimization import ssm_param_groups

RUN_CONFIG_FILE = "run_config.json"
SUMMARY_FILE = "run_summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_COMPLETE_MARKER = "trainer_progress.json"


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

    def __post_init__(self):
        positive = ("learning_rate", "num_epochs", "batch_size", "gradient_accumulation_steps", "keep_checkpoints",
                    "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainingConfig: `{name}` must be positive, got {getattr(self, name)!r}.")
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainingConfig: `{name}` must be positive or None, got {value!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainingConfig: `warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"TrainingConfig: `weight_decay` must be >= 0, got {self.weight_decay!r}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"TrainingConfig: `mixed_precision` must be 'no', 'bf16' or 'fp16', "
                             f"got {self.mixed_precision!r}.")

    # fields that may change between a run and its resume without changing its result
    RESUMABLE_CHANGES = ("progress", "cpu", "keep_checkpoints", "log_every")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (finished run, other configuration)."""


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    best_accuracy: float | None
    best_step: int | None
    final_metrics: dict
    resumed_from: int | None


class _Progress:
    """Trainer progress saved inside every checkpoint (registered with the Accelerator)."""

    def __init__(self):
        self.step = 0
        self.best_accuracy = None
        self.best_step = None

    def state_dict(self):
        return {"step": self.step, "best_accuracy": self.best_accuracy, "best_step": self.best_step}

    def load_state_dict(self, state):
        self.step, self.best_accuracy, self.best_step = state["step"], state["best_accuracy"], state["best_step"]


def train(model, train_dataset, eval_dataset, config: TrainingConfig, collate_fn=None) -> TrainResult:
    """See `_train`. Afterwards the process-wide Accelerator state is cleared (the process group
    of a distributed launch stays), so one process can run several trainings with different
    mixed-precision settings (the paper's experiment does)."""
    try:
        return _train(model, train_dataset, eval_dataset, config, collate_fn)
    finally:
        AcceleratorState._reset_state()  # private, but the only way: the state is a singleton


def _train(model, train_dataset, eval_dataset, config: TrainingConfig, collate_fn=None) -> TrainResult:
    """Train `model` (an S4-DSS model, trained in place; the run's weights are saved in
    `config.output_dir`) on `train_dataset`, evaluating on `eval_dataset` (or never, if None),
    and return a summary. Resumes automatically from the
    latest complete checkpoint of `config.output_dir`; refuses a folder holding a finished run or
    a run of another configuration."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    run_config = {"training": _comparable(config), "model": model.config.to_dict()}
    resume_dir = _prepare_run_folder(config.output_dir, run_config, accelerator)
    set_seed(config.seed)

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
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    resumed_from = None
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        resumed_from = progress.step
        _truncate_log(config.output_dir, progress.step, accelerator)

    eval_every = config.eval_every or steps_per_epoch
    save_every = config.save_every or steps_per_epoch
    bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not (
        config.progress and accelerator.is_local_main_process))
    running_loss, running_count, started = 0.0, 0, time.time()
    last_metrics: dict = {}
    model.train()
    while progress.step < total_steps:
        epoch, done_in_epoch = divmod(progress.step, steps_per_epoch)
        train_loader.set_epoch(epoch)  # the shuffled order depends only on (seed, epoch)
        batches = accelerator.skip_first_batches(train_loader, done_in_epoch * config.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            running_loss += loss.detach().float().item()
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress.step += 1
            bar.update(1)
            step = progress.step
            if step % config.log_every == 0 or step == total_steps:
                mean_loss = accelerator.gather(torch.tensor(running_loss / running_count, device=accelerator.device))
                _log(config.output_dir, accelerator, {
                    "step": step, "epoch": step / steps_per_epoch, "loss": round(mean_loss.mean().item(), 6),
                    "learning_rate": scheduler.get_last_lr()[0], "seconds": round(time.time() - started, 3),
                })
                bar.set_postfix(loss=f"{mean_loss.mean().item():.4f}")
                running_loss, running_count = 0.0, 0
            if eval_loader is not None and (step % eval_every == 0 or step == total_steps):
                last_metrics = evaluate_model(model, eval_loader, accelerator)
                _log(config.output_dir, accelerator,
                     {"step": step, **{f"eval_{name}": value for name, value in last_metrics.items()}})
                accuracy = last_metrics.get("accuracy")
                if accuracy is not None and (progress.best_accuracy is None or accuracy > progress.best_accuracy):
                    progress.best_accuracy, progress.best_step = accuracy, step
                    _save_model(accelerator, model, os.path.join(config.output_dir, "best"))
                model.train()
            if step % save_every == 0 and step < total_steps:
                _save_checkpoint(accelerator, config, step)
            if step >= total_steps:
                break
    bar.close()
    final_dir = os.path.join(config.output_dir, "final")
    _save_model(accelerator, model, final_dir)
    result = TrainResult(config.output_dir, progress.step, progress.best_accuracy, progress.best_step, last_metrics,
                         resumed_from)
    if accelerator.is_main_process:
        with open(os.path.join(final_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump({**asdict(result), "num_processes": accelerator.num_processes}, handle, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def evaluate_model(model, loader, accelerator) -> dict:
    """Mean loss and accuracy over the whole evaluation set, gathered over all processes
    (`gather_for_metrics` drops the samples duplicated to fill the last batch)."""
    model.eval()
    classification = accelerator.unwrap_model(model).config.num_labels > 1
    correct, count, loss_sum = 0, 0, 0.0
    for batch in loader:
        outputs = model(**batch)
        logits, labels = accelerator.gather_for_metrics((outputs.logits, batch["labels"]))
        if classification:
            correct += (logits.argmax(-1) == labels).sum().item()
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        else:
            loss_sum += torch.nn.functional.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum").item()
        count += labels.shape[0]
    metrics = {"loss": loss_sum / max(count, 1), "samples": count}
    if classification:
        metrics["accuracy"] = correct / max(count, 1)
    return metrics


def _comparable(config: TrainingConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in TrainingConfig.RESUMABLE_CHANGES}


def _prepare_run_folder(output_dir: str, run_config: dict, accelerator) -> str | None:
    """Create the run folder, or check it for a resume. Returns the checkpoint to resume from."""
    summary = os.path.join(output_dir, "final", SUMMARY_FILE)
    if os.path.exists(summary):
        raise RunFolderError(f"{output_dir} already holds a finished run ({summary}); choose another output folder "
                             "or delete it.")
    config_path = os.path.join(output_dir, RUN_CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        differences = _differences(saved, json.loads(json.dumps(run_config)))
        if differences:
            raise RunFolderError(f"{output_dir} holds a run with another configuration; differing fields: "
                                 f"{', '.join(differences)}. Use another output folder or the same settings.")
    elif os.path.isdir(output_dir) and os.listdir(output_dir):
        raise RunFolderError(f"{output_dir} exists and is not a run folder of this trainer (no {RUN_CONFIG_FILE}); "
                             "choose an empty or new folder.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        if not os.path.exists(config_path):
            with open(config_path, "w", encoding="utf-8") as handle:
                json.dump(run_config, handle, indent=2, default=str)
    accelerator.wait_for_everyone()
    return latest_checkpoint(output_dir)


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
    """The complete checkpoint with the highest step, or None."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return None
    complete = [
        name for name in os.listdir(root)
        if name.startswith("step_") and os.path.exists(os.path.join(root, name, _COMPLETE_MARKER))
    ]
    if not complete:
        return None
    return os.path.join(root, max(complete, key=lambda name: int(name.split("_")[1])))


def _save_checkpoint(accelerator, config: TrainingConfig, step: int) -> None:
    """`save_state` into a temporary folder renamed into place, so a run killed mid-write never
    leaves a checkpoint that looks complete; keeps the newest `keep_checkpoints`."""
    root = os.path.join(config.output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step_{step}")
    partial = os.path.join(root, f".partial_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, _COMPLETE_MARKER), "w", encoding="utf-8") as handle:
            json.dump({"step": step}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        steps = sorted(int(name.split("_")[1]) for name in os.listdir(root) if name.startswith("step_"))
        for old in steps[: -config.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_model(accelerator, model, directory: str) -> None:
    accelerator.wait_for_everyone()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar on every save
    try:
        accelerator.unwrap_model(model).save_pretrained(directory, is_main_process=accelerator.is_main_process)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    accelerator.wait_for_everyone()


def _log(output_dir: str, accelerator, record: dict) -> None:
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_log(output_dir: str, step: int, accelerator) -> None:
    """Drop log records written after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if accelerator.is_main_process and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            records = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(records)
    accelerator.wait_for_everyone()
