"""Fine-tune a saved S4-DSS classifier (e.g. one compressed by balanced truncation) with the
transformers `Trainer`, using the S4 optimizer parameter groups (`S4DSSTrainer`).

    # a small sMNIST model compressed to 4 modes per channel, saved in bt/
    python -c "import s4bt_hf as s; c = s.S4DSSConfig(input_dim=1, d_model=16, n_layers=2, d_state=8, num_labels=10);
    s.S4DSSForSequenceClassification(c).balanced_truncate(rank=4).save_pretrained('bt')"
    python examples/finetune_with_trainer.py --model bt --output bt-finetuned --max-train-samples 256 --epochs 1

The task follows the model: sMNIST for a model that reads `input_values`, ListOps (short
sequences) for one that reads `input_ids`. Both are built offline by `s4bt_hf.data`.
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments
from transformers.utils import logging

import s4bt_hf  # noqa: F401  (registers the model with the Auto classes)
from s4bt_hf.data import PadCollator, load_task, task_info
from s4bt_hf.metrics import compute_accuracy_metrics
from s4bt_hf.training.hf_trainer import S4DSSTrainer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a model saved with save_pretrained")
    parser.add_argument("--output", help="where to save the fine-tuned model (default: not saved)")
    parser.add_argument("--task", choices=["smnist", "psmnist", "listops"], help="default: from the model's inputs")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (the SSM dynamics use config.ssm_lr)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train-samples", type=int, help="train on the first N examples only")
    parser.add_argument("--max-eval-samples", type=int, default=256, help="validate on the first N examples only")
    return parser.parse_args()


def first(split, count):
    return split if count is None else split.select(range(min(count, len(split))))


def main():
    args = parse_args()
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32)
    task = args.task or ("listops" if model.config.uses_tokens else "smnist")
    info = task_info(task)
    if info.num_labels != model.config.num_labels:
        raise SystemExit(f"{task} has {info.num_labels} classes but the model has {model.config.num_labels} labels.")
    options = {}
    if task == "listops":  # generated: short sequences, and no more examples than used, keep a CPU run quick
        options = {"min_length": 20, "max_length": 200, "num_test": 0, "num_validation": args.max_eval_samples or 200}
        if args.max_train_samples:
            options["num_train"] = args.max_train_samples
    data = load_task(task, **options).with_format("torch")
    train, validation = first(data["train"], args.max_train_samples), first(data["validation"], args.max_eval_samples)
    print(f"{task}: {len(train)} train / {len(validation)} validation examples; model "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, d_state {model.config.d_state}")

    training_args = TrainingArguments(
        output_dir=args.output or tempfile.mkdtemp(prefix="s4bt-finetune-"),
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=0.1,  # a float is a ratio of the training steps
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=10,
        label_names=["labels"],
        disable_tqdm=True,
    )
    trainer = S4DSSTrainer(
        model=model,
        args=training_args,
        data_collator=PadCollator(pad_token_id=info.pad_token_id or 0),
        train_dataset=train,
        eval_dataset=validation,
        compute_metrics=compute_accuracy_metrics,
    )
    before = trainer.evaluate()
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation accuracy: {before['eval_accuracy']:.4f} before, {metrics['eval_accuracy']:.4f} after; "
          f"loss {before['eval_loss']:.4f} -> {metrics['eval_loss']:.4f}")
    if args.output:
        trainer.save_model(args.output)  # save_pretrained: config, weights, remote code, model card
        print(f"saved to {args.output}")


if __name__ == "__main__":
    logging.set_verbosity_warning()
    logging.disable_progress_bar()
    main()
