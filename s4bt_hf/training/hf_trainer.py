"""The transformers `Trainer` with the S4 optimizer parameter groups.

`S4DSSTrainer` is a `transformers.Trainer` whose optimizer has the three groups of
`ssm_param_groups`: the main weights (`args.learning_rate`, `args.weight_decay`), norms and biases
(`args.learning_rate`, no weight decay) and the SSM dynamics (`config.ssm_lr`,
`config.ssm_weight_decay`). Everything else (optimizer class from `args.optim` with its betas,
epsilon, fused settings and `optim_args`, the scheduler, which scales each group from its own
initial lr, checkpoints and resume, evaluation) is the stock Trainer's.

Gradient accumulation is correct because the model sets `accepts_loss_kwargs = False`: its loss
is a per-batch mean, so the Trainer divides it by `gradient_accumulation_steps` itself.

Compression-aware training: `hankel_weight` adds λ · `hankel_penalty(model)` to the loss (logged
as `hankel_penalty`, unweighted, beside `task_loss`; the Trainer's `loss` is their weighted sum),
and `reduction=ReductionSchedule(...)` reduces every layer during training (`ReductionCallback`).
"""

from __future__ import annotations

import json
import math
import numbers
import os

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, unwrap_peft_model

from ..compression_report import CompressionReport
from .accelerate_trainer import NonFiniteLossError
from .hankel_term import HankelTerm
from .optimization import ssm_param_groups
from .reduction_schedule import ReductionSchedule, reduce_during_training, resize_dss_layers, swap_optimizer_parameters

HANKEL_TERM_FILE = "hankel_term.pt"  # `HankelTerm.state_dict()` in a checkpoint of a `hankel_reuse` run

# Optimizer kwargs with which `get_optimizer_cls_and_kwargs` says that the optimizer builds its own
# parameter groups (GaLore/Apollo: "params", LOMO: "model", layer-wise: "optimizer_dict").
_SELF_GROUPING_KWARGS = ("params", "model", "optimizer_dict")


def _is_s4dss_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    # class names, not isinstance: a model loaded with trust_remote_code has its own classes
    return hasattr(config, "ssm_lr") and any(type(m).__name__ == "S4DSSKernel" for m in model.modules())


class S4DSSTrainer(Trainer):
    """`transformers.Trainer` for S4-DSS models: the optimizer uses the S4 parameter groups.

    Use it exactly like `Trainer`. The optimizer class and its kwargs come from
    `TrainingArguments` (`optim`, `adam_beta1/2`, `adam_epsilon`, `optim_args`) or from the
    `optimizer_cls_and_kwargs` argument; only the parameter groups differ. The main group comes
    first, so the logged `learning_rate` is the main one. `optimizers=(optimizer, scheduler)`
    still takes precedence, as in `Trainer`.

    Raises `TypeError` if the model is not an S4-DSS model (e.g. a model with no DSS kernels).

    Extra arguments (keywords):
        hankel_weight (`float`, default 0): add hankel_weight · `hankel_penalty(model)` to the
            training loss, evaluated on the first micro-batch of every `hankel_every`-th optimizer
            step with weight hankel_weight · hankel_every (the same strength on average).
        hankel_every (`int`, default 1).
        hankel_reuse (`bool`, default False): with `hankel_every` > 1, weight hankel_weight and the
            last evaluated gradient applied on the steps in between (`HankelTerm`). The kept
            gradient is saved in every checkpoint (`hankel_term.pt`) and read back on resume.
        reduction (`ReductionSchedule`): reduce every DSS layer during training (adds a
            `ReductionCallback`); a checkpoint written after the reduction resumes into the
            original model (`resume_from_checkpoint`), which is resized first.
    """

    def __init__(self, *args, hankel_weight: float = 0.0, hankel_every: int = 1, hankel_reuse: bool = False,
                 reduction: ReductionSchedule | None = None, **kwargs):
        _check_hankel_options(hankel_weight, hankel_every, hankel_reuse)
        reduction = ReductionSchedule.coerce(reduction)
        super().__init__(*args, **kwargs)
        self._hankel = HankelTerm(float(hankel_weight), int(hankel_every), hankel_reuse)
        self._hankel_step = None  # the optimizer step whose penalty term was added
        self._task_losses, self._penalties = [], []
        if self.model is not None and (self.optimizer is None or hankel_weight > 0 or reduction is not None):
            self._s4dss_model(self.model)  # fail now rather than when training starts
        if reduction is not None:
            reduction.check_model(self._s4dss_model(self.model))
            if self.args.load_best_model_at_end:
                raise ValueError("S4DSSTrainer: `reduction` cannot be combined with `load_best_model_at_end` (the "
                                 "best checkpoint may hold the model before its reduction, of another size).")
            self.add_callback(ReductionCallback(reduction))

    @property
    def hankel_weight(self) -> float:
        return self._hankel.weight

    @property
    def hankel_every(self) -> int:
        return self._hankel.every

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss, plus the weighted Hankel penalty when it is due (training only)."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self._hankel.active or not model.training:
            return result
        loss = result[0] if return_outputs else result
        self._task_losses.append(loss.detach().float().item())
        step = self.state.global_step
        if self._hankel_step == step:  # the term was added on this optimizer step already
            return result
        self._hankel_step = step
        term, penalty = self._hankel.loss_term(self._s4dss_model(model), step)
        if term is None:
            return result
        if penalty is not None:
            self._penalties.append(penalty)
        # training_step divides by the accumulation steps; the term is added once per optimizer step
        loss = loss + (getattr(self, "current_gradient_accumulation_steps", 1) * term).to(loss.dtype)
        return (loss, *result[1:]) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, then a stop at a non-finite loss, before the optimizer applies NaN
        gradients (one host read per micro-batch)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step + 1}: the loss is {loss.item()} (non-finite); "
                "the batch may hold NaN/Inf inputs or the model diverged (try a lower learning rate). The weights "
                "were not updated with it."
            )
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        """Training logs gain `task_loss` and `hankel_penalty` (means since the last log)."""
        if "loss" in logs and self._task_losses:
            logs["task_loss"] = round(sum(self._task_losses) / len(self._task_losses), 6)
            if self._penalties:
                logs["hankel_penalty"] = round(sum(self._penalties) / len(self._penalties), 6)
            self._task_losses, self._penalties = [], []
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, plus the Hankel term's kept gradient (with `hankel_reuse`)."""
        super()._save_checkpoint(model, trial)
        if self._hankel.reuse and self._hankel.active and self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            if os.path.isdir(folder):
                torch.save(self._hankel.state_dict(), os.path.join(folder, HANKEL_TERM_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: a checkpoint written after a scheduled reduction holds a smaller model; the
        model is resized (and given the checkpoint's compression report) before loading it. The
        Hankel term's kept gradient is read back (a checkpoint without it: evaluated afresh)."""
        hankel_state = os.path.join(resume_from_checkpoint, HANKEL_TERM_FILE)
        if self._hankel.reuse and os.path.isfile(hankel_state):
            self._hankel.load_state_dict(torch.load(hankel_state, map_location="cpu", weights_only=True))
        target = self._s4dss_model(self.model if model is None else model)
        config_path = os.path.join(resume_from_checkpoint, "config.json")
        if os.path.isfile(config_path) and hasattr(target.config, "layer_d_states"):
            with open(config_path, encoding="utf-8") as handle:
                saved = json.load(handle)["d_state"]
            states = saved if isinstance(saved, list) else [saved] * target.config.n_layers
            if states != target.config.layer_d_states:
                resize_dss_layers(target, states)
                target.compression_report = CompressionReport.load(resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _s4dss_model(self, model: nn.Module) -> nn.Module:
        """The S4-DSS model inside `model` (which may be wrapped by accelerate, DDP, FSDP or PEFT)."""
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        if not _is_s4dss_model(unwrapped):
            raise TypeError(
                f"S4DSSTrainer trains S4-DSS models (S4DSSForSequenceClassification, S4DSSModel), got "
                f"{type(unwrapped).__name__}: it has no DSS kernels or its config has no `ssm_lr`. "
                "Use transformers.Trainer for other models."
            )
        return unwrapped

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """The package's model card (architecture, compression report, load instructions) in
        `args.output_dir/README.md` — what `trainer.push_to_hub()` uploads — with the Trainer's
        hyperparameters and last evaluation (also as the `model-index`), instead of transformers'
        generic card, which would replace it. `license`, `dataset` (or `dataset_tags`), `tags`,
        `finetuned_from` (the card's `base_model`) and `model_name` go into its metadata;
        `language`, `tasks` and `dataset_args` are not used."""
        from transformers.modelcard import extract_hyperparameters_from_trainer

        from ..model_card import card_info, eval_results_from_metrics, render_model_card

        if not self.is_world_process_zero():
            return
        model = self._s4dss_model(self.model)
        info = card_info(model)
        names = dataset or dataset_tags or info.get("datasets")
        names = [names] if isinstance(names, str) else list(names or [])
        metrics = next((entry for entry in reversed(self.state.log_history) if "eval_loss" in entry), {})
        info.update({key: value for key, value in (("license", license), ("datasets", names or None),
                                                    ("base_model", finetuned_from)) if value})
        if metrics:
            info["eval_results"] = eval_results_from_metrics(metrics, model.config, names[0] if names else "custom",
                                                             "validation", prefix="eval_")
        model.card_info = info  # later saves of the model keep what the card says
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = render_model_card(model, title=model_name, tags=tags, training=_training_section(
            self, extract_hyperparameters_from_trainer(self), metrics))
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Build `self.optimizer` over `ssm_param_groups(model, args.learning_rate, args.weight_decay)`,
        unless an optimizer was already given or built."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = ssm_param_groups(self._s4dss_model(opt_model), self.args.learning_rate, self.args.weight_decay)

        # The optimizer must hold the parameters the (possibly wrapped) model trains: true unless a
        # wrapper replaced them (e.g. FSDP1 with flat parameters, use_orig_params=False).
        grouped = {id(param) for group in groups for param in group["params"]}
        trainable = {id(param) for param in opt_model.parameters() if param.requires_grad}
        if grouped != trainable:
            raise RuntimeError(
                "S4DSSTrainer: the wrapped model's trainable parameters are not those of the model inside it "
                f"({len(trainable)} trainable, {len(grouped)} grouped); with FSDP use `use_orig_params=True` "
                "or FSDP2."
            )

        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)  # never mutate the caller's dict
        optimizer_kwargs.pop("lr", None)  # each group has its own
        if is_optimizer_factory(optimizer_cls) or any(key in optimizer_kwargs for key in _SELF_GROUPING_KWARGS):
            raise ValueError(
                f"S4DSSTrainer: optim={self.args.optim!r} builds its own parameter groups and cannot take the "
                "S4 groups; choose a standard optimizer such as 'adamw_torch'."
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def _training_section(trainer, hyperparameters: dict, metrics: dict) -> str:
    """The card's "Training procedure" section: the Trainer's hyperparameters and last evaluation."""
    lines = ["## Training procedure", "",
             f"Trained with the transformers `Trainer` (`S4DSSTrainer`: the S4 parameter groups, SSM dynamics at "
             f"`config.ssm_lr`) for {trainer.state.global_step} optimizer steps.", "", "Hyperparameters:", ""]
    lines += [f"- {name}: {value}" for name, value in hyperparameters.items()]
    if metrics:
        lines += ["", "Last evaluation:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name.removeprefix('eval_')} | {value:.6g} |" for name, value in metrics.items()
                  if isinstance(value, numbers.Real) and name not in ("epoch", "step")]
    return "\n".join(lines)


def _check_hankel_options(hankel_weight, hankel_every, hankel_reuse) -> None:
    if not isinstance(hankel_reuse, bool):
        raise TypeError(f"S4DSSTrainer: `hankel_reuse` must be True or False, got {hankel_reuse!r}.")
    if isinstance(hankel_weight, bool) or not isinstance(hankel_weight, numbers.Real):
        raise TypeError(f"S4DSSTrainer: `hankel_weight` must be a number, got {hankel_weight!r}.")
    if not math.isfinite(hankel_weight) or hankel_weight < 0:
        raise ValueError(f"S4DSSTrainer: `hankel_weight` must be finite and >= 0, got {hankel_weight}.")
    if isinstance(hankel_every, bool) or not isinstance(hankel_every, numbers.Integral):
        raise TypeError(f"S4DSSTrainer: `hankel_every` must be an int, got {hankel_every!r}.")
    if hankel_every < 1:
        raise ValueError(f"S4DSSTrainer: `hankel_every` must be >= 1, got {hankel_every}.")
    if hankel_weight == 0 and (hankel_every != 1 or hankel_reuse):
        raise ValueError("S4DSSTrainer: `hankel_every`/`hankel_reuse` schedule the Hankel penalty, which is off "
                         "(`hankel_weight` is 0); set `hankel_weight` > 0 or leave them at their defaults.")


class ReductionCallback(TrainerCallback):
    """Applies a `ReductionSchedule` in a transformers `Trainer`: after optimizer step
    `schedule.step(state.max_steps)` the model is reduced in place and the optimizer's groups get
    the new parameters (fresh moments for them, the others keep theirs; the LR schedule goes on).
    The step is checked against the run when training begins, before any training step."""

    def __init__(self, schedule: ReductionSchedule):
        self.schedule = ReductionSchedule.coerce(schedule)
        self.reduction_step = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule.check_model(model)
        self.reduction_step = self.schedule.step(state.max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.reduction_step or _already_reduced_at(model, state.global_step):
            return
        swap_optimizer_parameters(optimizer, reduce_during_training(model, self.schedule, state.global_step,
                                                                    state.max_steps))
        control.should_log = True


def _already_reduced_at(model, step) -> bool:
    """Whether `model` was reduced after `step` already (a resumed run must not reduce twice)."""
    report = getattr(model, "compression_report", None)
    return report is not None and (report.training or {}).get("step") == step


__all__ = ["ReductionCallback", "S4DSSTrainer"]
