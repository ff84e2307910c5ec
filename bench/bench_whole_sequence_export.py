"""Whole-sequence export benchmark (not a test): the forward of a 4 x 128 classifier (N = 64,
batch 8) at several lengths, eager (`model(...)`, FFT or chunked convolution by the cost rule)
against the real-arithmetic module in torch and the ONNX graph of `export_model(...,
whole_sequence=True)` in onnxruntime, all with the same thread count. One export serves every
length (the graph has a dynamic length). Each time is the median over `--rounds` interleaved
rounds, so variants share the machine's load; compare ratios within one run. Also reports each
variant's relative error against eager. Prints one JSON line to stdout; progress goes to stderr.

    python bench/bench_whole_sequence_export.py [--quick] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import onnxruntime
import torch
from bench_common import available_cores, log

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.export import export_model, load_exported
from s4bt_hf.export.whole_sequence import WholeSequenceModule

D_MODEL, N_LAYERS, D_STATE, BATCH = 128, 4, 64, 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model and short lengths: a smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_cores())
    return parser.parse_args()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    d_model, n_layers, d_state = (16, 2, 8) if args.quick else (D_MODEL, N_LAYERS, D_STATE)
    lengths = (256, 1024) if args.quick else (784, 4096, 16384)
    torch.manual_seed(0)
    model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=d_model, n_layers=n_layers,
                                                       d_state=d_state, num_labels=10)).eval()
    module = WholeSequenceModule(model)
    result = {"model": {"d_model": d_model, "n_layers": n_layers, "d_state": d_state, "batch": BATCH},
              "threads": args.threads, "torch": torch.__version__, "lengths": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, "whole")
        log("exporting ...")
        start = time.perf_counter()
        export_model(model, folder, format="onnx", whole_sequence=True)
        result["export_s"] = round(time.perf_counter() - start, 1)
        load_exported(folder)  # validates the folder; the session below pins the thread count
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        result["onnx_bytes"] = os.path.getsize(os.path.join(folder, "model.onnx"))
        for length in lengths:
            log(f"L = {length}")
            inputs = torch.randn(BATCH, length, 1)
            mask = torch.ones(BATCH, length, dtype=torch.int64)
            feed = {"inputs": inputs.numpy(), "attention_mask": mask.numpy()}
            with torch.inference_mode():
                expected = model(input_values=inputs).logits
                variants = {
                    "eager_ms": lambda inputs=inputs: model(input_values=inputs),
                    "real_module_ms": lambda inputs=inputs, mask=mask: module(inputs, mask),
                    "onnxruntime_ms": lambda feed=feed: session.run(None, feed),
                }
                for function in variants.values():  # warm-up
                    function()
                samples = {name: [] for name in variants}
                for _ in range(args.rounds):
                    for name, function in variants.items():
                        samples[name].append(timed(function))
                entry = {name: round(statistics.median(values), 2) for name, values in samples.items()}
                scale = float(expected.abs().max())
                entry["real_module_relative_error"] = float((module(inputs, mask) - expected).abs().max()) / scale
                onnx_logits = torch.from_numpy(session.run(None, feed)[0])
                entry["onnxruntime_relative_error"] = float((onnx_logits - expected).abs().max()) / scale
            entry["onnxruntime_over_eager"] = round(entry["onnxruntime_ms"] / entry["eager_ms"], 3)
            entry["real_module_over_eager"] = round(entry["real_module_ms"] / entry["eager_ms"], 3)
            result["lengths"][str(length)] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()
