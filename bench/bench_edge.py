"""Edge benchmark (not a test): streaming speed, whole-sequence speed against rank, the
convolution cost rule, and the edge table of an original model, its rank-8 compression and their
int8 exports.

(a) streaming: steps/s of the 4-layer, H = 128 benchmark model (batch 1, one thread: one
    sequence on one core) at N = 64 and 8: eager with the discretisation recomputed every step
    (the code before the step cache, patched back in for this run), eager with the cache, the
    real-arithmetic module, onnxruntime fp32 and int8.
(b) whole_sequence: forward of a 4 x 128 classifier, batch 8, L = 784 and 4096, at N = 64 and 8,
    with the layer's forward as it was before the chunked path ("before", patched back in for this
    run) and as it is now ("auto": the cost rule picks FFT or chunked recurrence).
(c) convolution_cost: one layer's causal convolution (B = 8, H = 128), FFT against the chunked
    recurrence at the rule's chunk size, over N and L: the measurements behind the cost rule.
(d) edge_table: the `make reproduce` original shape (2 x 32, N = 64; `--model` a trained one),
    its rank-8 balanced truncation, and their ONNX int8 exports: parameters, bytes on disk, state
    per sequence, steps/s, whole-sequence ms, sMNIST test accuracy (with `--model`).
Every speed is the median over `--rounds` interleaved rounds, so variants share the machine's
load; compare ratios within one run. Prints one JSON line to stdout; progress goes to stderr.

    python bench/bench_edge.py [--model runs/.../final] [--quick] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import torch
from bench_common import available_cores, log

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.export import export_model, load_exported
from s4bt_hf.kernel_s4dss import chunked_convolution, convolution_chunk, fft_convolution, vandermonde_kernel
from s4bt_hf.modeling_s4dss import S4DSSKernel

D_MODEL, N_LAYERS = 128, 4
SEQ_BATCH = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained S4-DSS sMNIST classifier for the edge table (accuracy too)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_cores(), help="threads of whole-sequence runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=("streaming", "whole_sequence", "convolution_cost",
                                                                  "edge_table"))
    return parser.parse_args()


@contextlib.contextmanager
def uncached_steps():
    """The streaming step as it was before the cache: discretise at every step."""
    cached = S4DSSKernel.step_system
    S4DSSKernel.step_system = S4DSSKernel.compute_step_system
    try:
        yield
    finally:
        S4DSSKernel.step_system = cached


def fft_forward_before(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`S4DSSKernel.forward` as it was before the chunked path (FFT in (B, H, L), transposed back)."""
    dtype = self.compute_dtype()
    inputs = hidden_states.to(dtype).transpose(1, 2)
    outputs = fft_convolution(inputs, self.convolution_kernel(inputs.shape[-1]))
    outputs = outputs + self.D.to(dtype).unsqueeze(-1) * inputs
    return outputs.transpose(1, 2).to(hidden_states.dtype)


@contextlib.contextmanager
def convolution_mode(model, mode: str):
    """mode: "auto" (the cost rule), "fft", "chunked", or "before" (the code before this change)."""
    kernels = [module for module in model.modules() if isinstance(module, S4DSSKernel)]
    for kernel in kernels:
        if mode == "before":
            kernel.forward = fft_forward_before.__get__(kernel)
        else:
            kernel.convolution = mode
    try:
        yield
    finally:
        for kernel in kernels:
            kernel.convolution = "auto"
            kernel.__dict__.pop("forward", None)


def median_rounds(variants: dict, rounds: int) -> dict:
    """variants: name -> zero-argument function returning one measurement; interleaved rounds."""
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            samples[name].append(measure())
    return {name: round(statistics.median(values), 2) for name, values in samples.items()}


def eager_steps_per_s(model, steps: int, cached: bool = True) -> float:
    inputs = torch.randn(steps + 10, 1, model.config.input_dim)
    with torch.inference_mode(), (contextlib.nullcontext() if cached else uncached_steps()):
        state = model.init_streaming_state(1)
        for position in inputs[:10]:
            _, state = model.streaming_step(state, input_values=position)
        start = time.perf_counter()
        for position in inputs[10:]:
            _, state = model.streaming_step(state, input_values=position)
        return steps / (time.perf_counter() - start)


def module_steps_per_s(module, steps: int) -> float:
    inputs = torch.randn(steps + 10, 1, module.input_dim)
    with torch.inference_mode():
        state = module.initial_state(1)
        for position in inputs[:10]:
            _, *state = module(position, *state)
        start = time.perf_counter()
        for position in inputs[10:]:
            _, *state = module(position, *state)
        return steps / (time.perf_counter() - start)


def onnx_steps_per_s(runner, steps: int) -> float:
    """Bare onnxruntime session calls, the state fed back: what a deployment loop does."""
    names = [entry["name"] for entry in runner.inputs]
    inputs = torch.randn(steps + 10, 1, runner.inputs[0]["shape"][1]).numpy()
    state = runner.initial_state(1)
    for index, position in enumerate(inputs):
        if index == 10:
            start = time.perf_counter()
        _, *state = runner.session.run(None, dict(zip(names, [position, *state], strict=True)))
    return steps / (time.perf_counter() - start)


def streaming_section(args, folder: str) -> dict:
    steps = 100 if args.quick else 400
    torch.set_num_threads(1)
    results = []
    for d_state in (64, 8):
        torch.manual_seed(0)
        model = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=D_MODEL, n_layers=N_LAYERS,
                                                           d_state=d_state, num_labels=10)).eval()
        target = os.path.join(folder, f"stream-n{d_state}")
        export_model(model, target, format="onnx", int8=True)
        fp32, int8 = load_exported(target), load_exported(target, int8=True)
        module = model.streaming_module()
        speeds = median_rounds({
            "eager_uncached": lambda m=model: eager_steps_per_s(m, steps, cached=False),
            "eager_cached": lambda m=model: eager_steps_per_s(m, steps),
            "real_module": lambda m=module: module_steps_per_s(m, steps),
            "onnxruntime_fp32": lambda r=fp32: onnx_steps_per_s(r, steps),
            "onnxruntime_int8": lambda r=int8: onnx_steps_per_s(r, steps),
        }, args.rounds)
        speeds["cached_over_uncached"] = round(speeds["eager_cached"] / speeds["eager_uncached"], 2)
        results.append({"d_state": d_state, "steps_per_s": speeds})
        log(f"streaming N={d_state}: {speeds}")
    return {"model": {"n_layers": N_LAYERS, "d_model": D_MODEL, "input_dim": 1, "batch": 1, "threads": 1,
                      "steps": steps}, "results": results}


def forward_ms(model, length: int, mode: str) -> float:
    inputs = torch.randn(SEQ_BATCH, length, model.config.input_dim)
    with torch.inference_mode(), convolution_mode(model, mode):
        start = time.perf_counter()
        model(input_values=inputs)
        return (time.perf_counter() - start) * 1e3


def whole_sequence_section(args) -> dict:
    torch.set_num_threads(args.threads)
    lengths = (784,) if args.quick else (784, 4096)
    models = {}
    for d_state in (64, 8):
        torch.manual_seed(0)
        models[d_state] = S4DSSForSequenceClassification(S4DSSConfig(
            input_dim=1, d_model=D_MODEL, n_layers=N_LAYERS, d_state=d_state, num_labels=10)).eval()
    results = []
    for length in lengths:
        for model in models.values():
            forward_ms(model, length, "auto")  # warm-up
        ms = median_rounds({f"n{d}_{mode}": (lambda m=m, mode=mode, n=length: forward_ms(m, n, mode))
                            for d, m in models.items() for mode in ("before", "auto")}, args.rounds)
        ms["rank8_speedup_over_n64"] = round(ms["n64_auto"] / ms["n8_auto"], 2)
        ms["n64_now_over_before"] = round(ms["n64_auto"] / ms["n64_before"], 3)
        ms["rank8_speedup_over_n64_before"] = round(ms["n64_before"] / ms["n8_before"], 2)
        results.append({"length": length, "ms": ms,
                        "chunk": {d: convolution_chunk(d, length) for d in models}})
        log(f"whole sequence L={length}: {ms}")
    return {"model": {"n_layers": N_LAYERS, "d_model": D_MODEL, "batch": SEQ_BATCH, "threads": args.threads},
            "results": results}


def convolution_cost_section(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    results = []
    for length in ((784,) if args.quick else (784, 4096)):
        inputs = torch.randn(SEQ_BATCH, length, D_MODEL, generator=generator)  # the model's layout
        for num_modes in (4, 8, 16, 32, 64):
            log_a_bar = torch.complex(-0.01 * torch.rand(D_MODEL, num_modes, generator=generator),
                                      0.1 * torch.randn(D_MODEL, num_modes, generator=generator))
            weights = torch.randn(D_MODEL, num_modes, dtype=torch.complex64, generator=generator)
            chunk = convolution_chunk(num_modes, length, force=True)

            def fft(log_a_bar=log_a_bar, weights=weights, inputs=inputs):
                start = time.perf_counter()
                kernel = vandermonde_kernel(log_a_bar, weights[None], inputs.shape[1])
                fft_convolution(inputs.transpose(1, 2), kernel).transpose(1, 2).contiguous()
                return (time.perf_counter() - start) * 1e3

            def chunked(log_a_bar=log_a_bar, weights=weights, inputs=inputs, chunk=chunk):
                start = time.perf_counter()
                chunked_convolution(inputs, log_a_bar, weights, chunk).contiguous()
                return (time.perf_counter() - start) * 1e3

            with torch.inference_mode():
                fft(), chunked()  # warm-up
                ms = median_rounds({"fft": fft, "chunked": chunked}, max(3, args.rounds))
            row = {"length": length, "d_state": num_modes, "chunk": chunk, "ms": ms,
                   "chunked_over_fft": round(ms["chunked"] / ms["fft"], 3),
                   "rule_picks": "chunked" if convolution_chunk(num_modes, length) else "fft"}
            results.append(row)
            log(f"convolution cost: {row}")
    return {"batch": SEQ_BATCH, "d_model": D_MODEL, "threads": args.threads, "results": results}


def smnist_accuracy(model, runner=None) -> float:
    """Test accuracy: eager whole-sequence forward, or the exported step streamed over the split."""
    from s4bt_hf.data import load_task

    test = load_task("smnist", seed=0)["test"].with_format("torch")[:]
    inputs, labels = test["input_values"].to(torch.float32), test["labels"]
    if runner is None:
        with torch.inference_mode():
            logits = torch.cat([model(input_values=chunk).logits for chunk in inputs.split(100)])
    else:
        logits = runner.run(inputs.transpose(0, 1))[-1]  # logits after the last position
    return round(100.0 * float((torch.as_tensor(logits).argmax(-1) == labels).float().mean()), 2)


def edge_table_section(args, folder: str) -> dict:
    if args.model:
        original = S4DSSForSequenceClassification.from_pretrained(args.model).eval()
        source = args.model
    else:
        torch.manual_seed(0)
        original = S4DSSForSequenceClassification(S4DSSConfig(input_dim=1, d_model=32, n_layers=2, d_state=64,
                                                              num_labels=10)).eval()
        source = "untrained, the reproduce original's shape (no accuracy)"
    compressed = original.balanced_truncate(rank=8).eval()
    steps = 100 if args.quick else 400
    rows = {}
    for name, model in (("original", original), ("rank8", compressed)):
        torch.set_num_threads(1)
        saved = os.path.join(folder, f"{name}-saved")
        model.save_pretrained(saved)
        target = os.path.join(folder, f"{name}-onnx")
        description = export_model(model, target, format="onnx", int8=True)
        fp32, int8 = load_exported(target), load_exported(target, int8=True)
        speeds = median_rounds({
            "eager_uncached": lambda m=model: eager_steps_per_s(m, steps, cached=False),
            "eager_cached": lambda m=model: eager_steps_per_s(m, steps),
            "onnxruntime_fp32": lambda r=fp32: onnx_steps_per_s(r, steps),
            "onnxruntime_int8": lambda r=int8: onnx_steps_per_s(r, steps),
        }, args.rounds)
        torch.set_num_threads(args.threads)
        whole = {}
        for length in ((784,) if args.quick else (784, 4096)):
            forward_ms(model, length, "auto")
            whole[f"L{length}_ms"] = median_rounds({"auto": lambda m=model, n=length: forward_ms(m, n, "auto")},
                                                   args.rounds)["auto"]
        row = {
            "d_state": description["model"]["d_state"],
            "parameters": description["parameters"],
            "bytes": {"safetensors": os.path.getsize(os.path.join(saved, "model.safetensors")),
                      "onnx_fp32": description["file_bytes"]["model.onnx"],
                      "onnx_int8": description["file_bytes"]["model.int8.onnx"]},
            "state_bytes_per_sequence": description["state_bytes_per_sequence"],
            "steps_per_s": speeds,
            "whole_sequence_batch8": whole,
            "export_check": description["check"],
        }
        if args.model:
            row["accuracy"] = {"eager_fp32": smnist_accuracy(model),
                               "onnxruntime_fp32": smnist_accuracy(model, fp32),
                               "onnxruntime_int8": smnist_accuracy(model, int8)}
        rows[name] = row
        log(f"edge table {name}: {row}")
    return {"source": source, "rows": rows}


def main() -> None:
    args = parse_args()
    if args.quick:
        args.rounds = 1
    result = {"benchmark": "s4dss_edge", "rounds": args.rounds, "threads": args.threads, "quick": args.quick,
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        if "streaming" not in args.skip:
            result["streaming"] = streaming_section(args, folder)
        if "whole_sequence" not in args.skip:
            result["whole_sequence"] = whole_sequence_section(args)
        if "convolution_cost" not in args.skip:
            result["convolution_cost"] = convolution_cost_section(args)
        if "edge_table" not in args.skip:
            result["edge_table"] = edge_table_section(args, folder)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
