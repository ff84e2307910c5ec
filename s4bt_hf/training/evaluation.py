"""Loss and accuracy of a model on a dataset, in one process (the offline accuracy metric)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..metrics import load_accuracy


@torch.no_grad()
def evaluate_dataset(model, dataset, batch_size: int = 64, collate_fn=None, progress: bool = False,
                     description: str = "evaluate") -> dict:
    """{"samples", "loss", "accuracy"} of `model` (switched to eval mode) on `dataset`; accuracy
    from the package's `evaluate` metric module (works offline)."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    accuracy = load_accuracy(keep_in_memory=True)
    device = next(model.parameters()).device
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in tqdm(loader, desc=description, disable=not progress):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        outputs = model(**batch)
        loss_sum += outputs.loss.item() * batch["labels"].shape[0]
        count += batch["labels"].shape[0]
        accuracy.add_batch(predictions=outputs.logits.argmax(-1).cpu(), references=batch["labels"].cpu())
    return {"samples": count, "loss": loss_sum / max(count, 1), **accuracy.compute()}
