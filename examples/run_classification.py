"""Fine-tune or train an S4-DSS sequence classifier on your own data with the transformers `Trainer`
(`S4DSSTrainer`: the S4 optimizer parameter groups), in the style of transformers' example scripts.

Data: `--train_file` (and optionally `--validation_file`, `--test_file`: CSV, JSON lines or
Parquet), `--dataset_name` (a local `save_to_disk` folder or a folder of data files), or a built-in
task (`--task_name smnist|psmnist|listops`). Inputs are sequences: `--input_columns` (one column
per channel, or one column of (L, C) sequences), or `--text_column` with `--tokenizer_name`.
Labels: `--label_column` (default `label`, then `labels`); the problem type follows from them.

Model: `--model_name_or_path` (a saved S4-DSS classifier, e.g. a compressed one), or a new model
from `--d_model/--n_layers/--d_state/...`; `--reduce_method/--reduce_rank` compress it first (the
paper's "main training" of the reduced model).

    python examples/run_classification.py --train_file train.parquet --test_file test.parquet \
        --input_columns signal --d_model 32 --n_layers 2 --d_state 32 \
        --output_dir runs/mine --do_train --do_eval --do_predict --num_train_epochs 3 --use_cpu

It runs unchanged under `accelerate launch` and `torchrun`. The output folder gets the model, its
preprocessor (the fitted `S4DSSFeatureExtractor`, or the tokenizer) and the metrics as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers import logging as hf_logging

import s4bt_hf
from s4bt_hf.data import PadCollator, load_task, task_info
from s4bt_hf.data.user_data import DataError, UserData, load_user_task
from s4bt_hf.metrics import compute_metrics_for
from s4bt_hf.model_card import derived_card_info
from s4bt_hf.training import S4DSSTrainer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "a saved S4-DSS classifier; default: "
                                                                   "a new model from the fields below"})
    d_model: int = field(default=64, metadata={"help": "channels of a new model"})
    n_layers: int = field(default=4, metadata={"help": "DSS blocks of a new model"})
    d_state: int = field(default=64, metadata={"help": "complex modes per channel of a new model"})
    dropout: float = field(default=0.0, metadata={"help": "dropout of a new model"})
    bidirectional: bool = field(default=False, metadata={"help": "a new model with two-sided kernels"})
    ssm_lr: float = field(default=1e-3, metadata={"help": "learning rate of the SSM dynamics of a new model"})
    reduce_method: str | None = field(default=None, metadata={"help": "compress before training: "
                                                              "balanced_truncation, singular_perturbation, ..."})
    reduce_rank: int | None = field(default=None, metadata={"help": "complex modes per channel to keep"})


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": "a built-in task: smnist, psmnist, listops"})
    train_file: str | None = field(default=None, metadata={"help": "CSV, JSON lines or Parquet"})
    validation_file: str | None = field(default=None, metadata={"help": "default: a seeded split of the training "
                                                                "file"})
    test_file: str | None = field(default=None)
    dataset_name: str | None = field(default=None, metadata={"help": "a local dataset folder (save_to_disk, or "
                                                             "data files)"})
    input_columns: list[str] = field(default_factory=list, metadata={"help": "sequence column(s)"})
    text_column: str | None = field(default=None)
    tokenizer_name: str | None = field(default=None, metadata={"help": "what AutoTokenizer loads (with "
                                                               "--text_column)"})
    label_column: str | None = field(default=None)
    problem_type: str | None = field(default=None, metadata={"help": "single_label_classification, "
                                                             "multi_label_classification or regression"})
    validation_split_percentage: int = field(default=10)
    max_seq_length: int | None = field(default=None, metadata={"help": "tokens kept per text"})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def load_data(data_args: DataTrainingArguments, seed: int):
    """(TaskInfo, splits) of a built-in task or of the user's data."""
    if data_args.task_name is not None:
        info = task_info(data_args.task_name)
        return info, load_task(data_args.task_name, seed=seed)
    info = load_user_task(UserData(
        train_file=data_args.train_file, validation_file=data_args.validation_file, test_file=data_args.test_file,
        dataset=data_args.dataset_name, input_columns=tuple(data_args.input_columns),
        text_column=data_args.text_column, tokenizer=data_args.tokenizer_name, label_column=data_args.label_column,
        problem_type=data_args.problem_type, validation_split_percentage=data_args.validation_split_percentage,
        seed=seed, max_length=data_args.max_seq_length,
    ))
    return info, info.builder()


def build_model(model_args: ModelArguments, info):
    if model_args.model_name_or_path is not None:
        model = s4bt_hf.S4DSSForSequenceClassification.from_pretrained(model_args.model_name_or_path,
                                                                        dtype=torch.float32)
        expected = {**info.model_inputs(), "num_labels": info.num_labels}
        found = {name: getattr(model.config, name) for name in expected}
        if found != expected:
            raise SystemExit(f"{model_args.model_name_or_path} does not fit the data: the data need {expected}, "
                             f"the model has {found}.")
    else:
        config = s4bt_hf.S4DSSConfig(**info.model_inputs(), **info.model_labels(), d_model=model_args.d_model,
                                     n_layers=model_args.n_layers, d_state=model_args.d_state,
                                     dropout=model_args.dropout, bidirectional=model_args.bidirectional,
                                     ssm_lr=model_args.ssm_lr)
        model = s4bt_hf.S4DSSForSequenceClassification(config)
    if model_args.reduce_method is not None:
        if model_args.reduce_rank is None:
            raise SystemExit("--reduce_method needs --reduce_rank (complex modes per channel to keep).")
        model = model.eval().reduce(model_args.reduce_method, rank=model_args.reduce_rank)
        logger.info("reduced by %s to rank %d", model_args.reduce_method, model_args.reduce_rank)
    return model


def first(split, count):
    return split if count is None else split.select(range(min(count, len(split))))


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if
                        training_args.should_log else logging.WARNING, stream=sys.stdout)
    hf_logging.set_verbosity_warning()
    set_seed(training_args.seed)
    try:
        info, splits = load_data(data_args, training_args.seed)
    except DataError as error:
        raise SystemExit(f"run_classification.py: error: {error}") from None
    model = build_model(model_args, info)
    # what the saved model's card says about its data (and, fine-tuned, what it started from)
    # (fine-tuned or reduced: the original's card, less its results, with the original as base_model)
    model.card_info = {**derived_card_info(model), "datasets": [info.name],
                       "data": info.describe({"seed": training_args.seed})}
    splits = splits.with_format("torch")
    train = first(splits["train"], data_args.max_train_samples)
    validation = first(splits["validation"], data_args.max_eval_samples)
    trainer = S4DSSTrainer(
        model=model, args=training_args, train_dataset=train if training_args.do_train else None,
        eval_dataset=validation if training_args.do_eval else None, data_collator=PadCollator(info.pad_token_id or 0),
        compute_metrics=compute_metrics_for(model.config.problem_type or info.problem_type),
    )
    results = {}
    if training_args.do_train:
        outcome = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        results.update(outcome.metrics)
    if training_args.do_eval:
        results.update(trainer.evaluate())
    if training_args.do_predict and "test" in splits:
        results.update(trainer.predict(splits["test"], metric_key_prefix="test").metrics)
    if training_args.do_train:
        trainer.create_model_card(dataset=info.name)  # the package's card, with the Trainer's last evaluation
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        if info.preprocessor is not None:
            info.preprocessor.save_pretrained(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump({**results, "num_processes": training_args.world_size}, handle, indent=2)
        logger.info("results: %s", json.dumps(results))
    return results


if __name__ == "__main__":
    main()
