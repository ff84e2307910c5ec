"""A first tour of s4bt_hf (`make demo`, a few seconds on a CPU).

1. Build a small S4-DSS classifier and take one training step's forward + backward.
2. Stream one sequence through it position by position and check that the recurrent pass gives
   the same logits as the convolutional forward.
3. Save it with `save_pretrained` and reload it through the transformers Auto classes.

Raises if either check fails.
"""

import tempfile

import torch
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

# Importing s4bt_hf also registers the model with the transformers Auto classes.
from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification

BATCH, LENGTH, NUM_LABELS = 8, 128, 10
# float32 FFT convolution against a float32 recurrence: they agree to rounding, not bit for bit.
STREAMING_TOLERANCE = 1e-5


def main() -> None:
    logging.disable_progress_bar()  # keep the demo's output to its own lines
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=1, d_model=32, n_layers=2, d_state=16, num_labels=NUM_LABELS)
    model = S4DSSForSequenceClassification(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    # 1. Training: real-valued sequences (batch, length, input_dim) with one class label each.
    inputs = torch.randn(BATCH, LENGTH, 1)
    labels = torch.randint(0, NUM_LABELS, (BATCH,))
    loss = model(input_values=inputs, labels=labels).loss
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    print(f"train step: loss {loss.item():.4f}, gradient norm {grad_norm.item():.4f}")

    # 2. Streaming: a unidirectional model is also a recurrence, one position at a time in O(1)
    # memory. Its logits after the last position must equal the convolutional forward's.
    model.eval()
    sequence = inputs[:1]
    with torch.inference_mode():
        conv_logits = model(input_values=sequence).logits
        state = model.init_streaming_state(batch_size=1)
        for position in range(LENGTH):
            stream_logits, state = model.streaming_step(state, input_values=sequence[:, position])
    streaming_diff = (stream_logits - conv_logits).abs().max().item()
    print(f"streaming: max |streamed - convolutional logits| = {streaming_diff:.2e}")
    if streaming_diff > STREAMING_TOLERANCE:
        raise RuntimeError(f"streamed logits differ from the forward's by {streaming_diff:.2e}")

    # 3. Save and reload: the Auto class finds the model through the registration done on import.
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        model.save_pretrained(checkpoint_dir)
        reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir).eval()
    with torch.inference_mode():
        reloaded_logits = reloaded(input_values=sequence).logits
    if not torch.equal(reloaded_logits, conv_logits):
        raise RuntimeError(f"reloaded {type(reloaded).__name__} gives different logits")
    print(f"reload: {type(reloaded).__module__}.{type(reloaded).__name__} gives identical logits")


if __name__ == "__main__":
    main()
