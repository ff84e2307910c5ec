"""Benchmark of the S4-DSS layer (not a test).

(a) Training step: forward + backward throughput (sequences/s) and peak memory of one DSS block
    (unidirectional, LayerNorm, pre-norm), batch 32, H = 128, N = 64, at several lengths. Each
    length runs in a fresh subprocess, so that its peak memory is its own.
(b) Streaming: recurrent steps/s of a 4-layer model (input_dim 1, H = 128), batch 1, at N = 8, 64.

Prints exactly one JSON line to stdout; progress goes to stderr.

    python bench/bench_model.py [--device cpu|cuda] [--quick] [--lengths 256 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from bench_common import available_cores, log

from s4bt_hf import S4DSSConfig, S4DSSModel

BATCH = 32
D_MODEL = 128
D_STATE = 64
STREAMING_LAYERS = 4
STREAMING_D_STATES = (8, 64)
# ru_maxrss is in KiB on Linux and in bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run, not a measurement")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    # internal: measure one length in this process and print its result as JSON
    parser.add_argument("--one-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_block(device: torch.device) -> torch.nn.Module:
    """One initialised DSS block. A bare `S4DSSBlock` has uninitialised parameters (the model's
    `post_init` fills them), so take the block out of a one-layer model."""
    config = S4DSSConfig(d_model=D_MODEL, n_layers=1, d_state=D_STATE, bidirectional=False, norm="layer", prenorm=True)
    return S4DSSModel(config).layers[0].to(device).train()


def peak_memory_baseline(device: torch.device) -> int:
    """Bytes in use now, against which `peak_memory_increase` measures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES


def peak_memory_increase(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES - baseline


def measure_train_step(length: int, device: torch.device, quick: bool) -> dict:
    """Forward + backward of one block on a (BATCH, length, D_MODEL) batch."""
    min_iterations, min_seconds = (1, 0.5) if quick else (2, 3.0)
    torch.manual_seed(0)
    block = make_block(device)
    # requires_grad: inside a stack a block also backpropagates to its input
    inputs = torch.randn(BATCH, length, D_MODEL, device=device, requires_grad=True)
    synchronize(device)
    baseline = peak_memory_baseline(device)

    def train_step() -> None:
        block(inputs).square().mean().backward()
        block.zero_grad(set_to_none=True)
        inputs.grad = None

    train_step()  # warm-up: first-call allocations and kernel selection
    iterations = 0
    synchronize(device)
    start = time.perf_counter()
    while iterations < min_iterations or time.perf_counter() - start < min_seconds:
        train_step()
        iterations += 1
        synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "length": length,
        "seq_per_s": round(iterations * BATCH / elapsed, 2),
        "peak_mem_mib": round(peak_memory_increase(device, baseline) / MIB, 1),
        "iterations": iterations,
    }


def run_length_in_subprocess(length: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--one-length", str(length)]
    command += ["--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def measure_streaming(d_state: int, device: torch.device, quick: bool) -> dict:
    warmup_steps, timed_steps = (5, 50) if quick else (20, 200)
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=1, d_model=D_MODEL, n_layers=STREAMING_LAYERS, d_state=d_state)
    model = S4DSSModel(config).to(device).eval()
    samples = torch.randn(warmup_steps + timed_steps, 1, 1, device=device)  # (steps, batch 1, input_dim 1)
    state = model.init_streaming_state(batch_size=1)
    for sample in samples[:warmup_steps]:
        _, state = model.streaming_step(state, input_values=sample)
    synchronize(device)
    start = time.perf_counter()
    for sample in samples[warmup_steps:]:
        _, state = model.streaming_step(state, input_values=sample)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"d_state": d_state, "steps": timed_steps, "steps_per_s": round(timed_steps / elapsed, 1)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.one_length is not None:
        print(json.dumps(measure_train_step(args.one_length, device, args.quick)))
        return

    train_step = []
    for length in args.lengths:
        train_step.append(run_length_in_subprocess(length, args))
        log(f"train step L={length}: {train_step[-1]}")
    streaming = []
    for d_state in STREAMING_D_STATES:
        streaming.append(measure_streaming(d_state, device, args.quick))
        log(f"streaming N={d_state}: {streaming[-1]}")

    peak_mem_source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    result = {
        "benchmark": "s4dss_layer",
        "device": args.device,
        "threads": args.threads,
        "quick": args.quick,
        "batch": BATCH,
        "d_model": D_MODEL,
        "d_state": D_STATE,
        "train_step": train_step,
        "peak_mem_meaning": f"increase of {peak_mem_source} over the process after creating the block and inputs",
        "streaming_model": {"n_layers": STREAMING_LAYERS, "d_model": D_MODEL, "input_dim": 1, "batch": 1},
        "streaming": streaming,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
