"""A small training run for the trainer tests, started as its own process (also under
`accelerate launch`): python train_child.py OUTPUT_DIR [--kill-at-sample N] [--epochs E] [--bf16]
[--hankel-weight W] [--reduce-at STEP]

With --kill-at-sample the process SIGKILLs itself when the data loader fetches that sample
(counted over the whole run), i.e. in the middle of a training step."""

import argparse
import os
import signal

import datasets
import torch

import s4bt_hf
from s4bt_hf.training import ReductionSchedule, TrainingConfig, train


class KillingDataset(torch.utils.data.Dataset):
    def __init__(self, base, kill_at):
        self.base, self.kill_at, self.fetched = base, kill_at, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        self.fetched += 1
        if self.kill_at is not None and self.fetched == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.base[index]


def toy_dataset(count, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, 24, 1, generator=generator)
    labels = (values.mean((1, 2)) > 0).long()
    return datasets.Dataset.from_dict({"input_values": values.numpy(), "labels": labels.numpy()}).with_format("torch")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-sample", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--hankel-weight", type=float, default=0.0)
    parser.add_argument("--reduce-at", type=int, default=None, help="reduce to rank 2 after this optimizer step")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = s4bt_hf.S4DSSConfig(d_model=8, n_layers=2, d_state=4, num_labels=2, dropout=0.1, norm="batch")
    model = s4bt_hf.S4DSSForSequenceClassification(config)
    train_data = KillingDataset(toy_dataset(70, seed=1), args.kill_at_sample)
    training = TrainingConfig(
        output_dir=args.output_dir, num_epochs=args.epochs, batch_size=8, gradient_accumulation_steps=2,
        save_every=2, eval_every=3, log_every=1, progress=False, mixed_precision="bf16" if args.bf16 else "no",
        hankel_weight=args.hankel_weight,
        reduction=None if args.reduce_at is None else ReductionSchedule(at=args.reduce_at, rank=2),
    )
    train(model, train_data, toy_dataset(30, seed=2), training)


if __name__ == "__main__":
    main()
