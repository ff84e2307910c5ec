"""Benchmark of balanced truncation (not a test).

Wall time of `model.balanced_truncate(rank=...)` on a seeded S4DSSModel (input_dim 1, Skew-HiPPO
modes), by default 6 layers x 256 channels x 64 modes compressed to rank 16, best of `--repeats`
runs (target: 1 s). Also a breakdown for ONE layer: the pure-math steps of
`s4bt_hf.balanced_truncation` on that layer's systems, built as `compression.py` builds them, the
model-level overhead (total minus the sum of the layers' `reduce_to_modes`), and floors: the time
of only the dense decompositions (eigenvalues only; with vectors) that the method cannot avoid.

Prints exactly one JSON line to stdout; progress goes to stderr.

    python bench/bench_compression.py [--quick] [--repeats 3] [--threads 2] [--layers 6] [--d-model 256]
                                      [--d-state 64] [--rank 16] [--bidirectional]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from bench_common import available_cores, log

from s4bt_hf import S4DSSConfig, S4DSSModel, diagonal_system
from s4bt_hf import balanced_truncation as bt
from s4bt_hf.compression import _layer_system

TARGET_SECONDS = 1.0
SEED = 0
TIME_DOMAIN = bt.DISCRETE  # `balanced_truncate`'s default
QUICK_SIZE = {"layers": 2, "d_model": 64}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best one is reported")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SIZE['layers']} layers x {QUICK_SIZE['d_model']} channels, one repeat: "
                             "a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.d_model, args.repeats = QUICK_SIZE["layers"], QUICK_SIZE["d_model"], 1
    for name in ("repeats", "threads", "layers", "d_model", "d_state", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rank > args.d_state:
        parser.error(f"--rank {args.rank} is larger than --d-state {args.d_state}")
    return args


def rounded(seconds: float) -> float:
    return round(seconds, 4)


def best_time(function: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """(best, all) wall times in seconds of `repeats` calls of `function`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), times


def make_model(args: argparse.Namespace) -> S4DSSModel:
    torch.manual_seed(SEED)
    config = S4DSSConfig(input_dim=1, d_model=args.d_model, n_layers=args.layers, d_state=args.d_state,
                         init="skew_hippo", bidirectional=args.bidirectional)
    return S4DSSModel(config).eval()


def chunk_size(channels: int, workers: int) -> int:
    """Systems per chunk, as `reduce_to_modes` splits a layer among its worker threads."""
    return max(1, min(diagonal_system._CHUNK_SIZE, -(-channels // workers)))


def balancing_steps(system) -> dict[str, Callable]:
    """The steps of `balancing_factors` on one chunk of systems, as functions of the previous
    steps' results: Gramian(s), Cholesky factor(s), decomposition of L_oᵀ L_c (a symmetric
    eigendecomposition for one output, an SVD otherwise)."""
    modes, input_vec, output_vec = system
    if output_vec.shape[-2] == 1:
        unit, residues = bt.residue_form(input_vec, output_vec)
        return {
            "gramians": lambda: bt.reachability_gramian(modes, unit, TIME_DOMAIN),
            "cholesky": lambda reach: bt.psd_factor(reach),
            "hankel_decomposition": lambda factor: bt.symmetric_hankel_svd(factor[0], residues[:, 0]),
        }
    return {
        "gramians": lambda: bt.real_gramians(modes, input_vec, output_vec, TIME_DOMAIN),
        "cholesky": lambda gramians: (bt.psd_factor(gramians[0]), bt.psd_factor(gramians[1])),
        "hankel_decomposition": lambda factors: bt.hankel_svd(factors[0][0], factors[1][0]),
    }


def decompositions_only(system) -> dict[str, Callable[[], object]]:
    """Only the dense decomposition of a chunk's precomputed 2N x 2N matrix L_cᵀ S L_c (one
    output) or L_oᵀ L_c (two outputs), with no Gramians, factors, projection or folding:
    "eigenvalues_only" (eigvalsh / svdvals: what the Hankel singular values need) and
    "eigendecomposition" (eigh / svd: what the projectors need). No exact method that
    decomposes this matrix with torch's LAPACK can be faster."""
    steps = balancing_steps(system)
    factors = steps["cholesky"](steps["gramians"]())
    modes, input_vec, output_vec = system
    if output_vec.shape[-2] == 1:
        residues = bt.residue_form(input_vec, output_vec)[1][:, 0]
        product = bt.symmetric_hankel_product(factors[0], residues)[0]
        return {"eigenvalues_only": lambda: torch.linalg.eigvalsh(product),
                "eigendecomposition": lambda: torch.linalg.eigh(product)}
    product = factors[1][0].mT @ factors[0][0]
    return {"eigenvalues_only": lambda: torch.linalg.svdvals(product),
            "eigendecomposition": lambda: torch.linalg.svd(product)}


def chunks_of(system) -> list:
    """The chunks `reduce_to_modes` splits a layer's systems into, in complex128."""
    modes, input_vec, output_rows, _ = system
    flat = [tensor.to(torch.complex128) for tensor in (modes, input_vec, output_rows)]
    chunk = chunk_size(modes.shape[0], torch.get_num_threads())
    return list(zip(*(tensor.split(chunk) for tensor in flat), strict=True))


def single_threaded(function: Callable, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_time(function, repeats)[0]
    finally:
        torch.set_num_threads(threads)


def step_breakdown(system, rank: int, repeats: int) -> dict:
    """Single-threaded wall time of each step of `_truncate_flat` on one layer, summed over the chunks
    `reduce_to_modes` splits the layer into (comparable with `reduce_to_modes_serial`)."""
    pieces = chunks_of(system)
    step_lists = [balancing_steps(piece) for piece in pieces]
    names = list(step_lists[0])
    # each step's input, computed once outside the timings
    inputs = []
    for steps in step_lists:
        values = [()]
        for name in names[:-1]:
            values.append((steps[name](*values[-1]),))
        inputs.append(values)
    result = {
        name: rounded(single_threaded(
            lambda position=position, name=name: [steps[name](*values[position])
                                                   for steps, values in zip(step_lists, inputs, strict=True)],
            repeats))
        for position, name in enumerate(names)
    }
    modes, input_vec, output_rows, _ = system
    serial = best_time(lambda: bt.reduce_to_modes(modes, input_vec, output_rows, rank, time=TIME_DOMAIN,
                                                  workers=1), repeats)[0]
    result["reduce_to_modes_serial"] = rounded(serial)
    # projection, re-diagonalisation (eig + inv), folding, chunk/thread bookkeeping
    result["rest_of_reduce_to_modes_serial"] = rounded(serial - sum(result[name] for name in names))
    result["chunks"] = len(pieces)
    result["chunk_size"] = pieces[0][0].shape[0]
    return result


def decomposition_floors(systems, repeats: int) -> dict[str, float]:
    """Seconds for only the dense decompositions (`decompositions_only`) of every channel of
    every layer, single-threaded, divided by the thread count (perfect scaling)."""
    work = [decompositions_only(piece) for system in systems for piece in chunks_of(system)]
    return {
        name: rounded(single_threaded(lambda name=name: [functions[name]() for functions in work], repeats)
                      / torch.get_num_threads())
        for name in ("eigenvalues_only", "eigendecomposition")
    }


def rediagonalisation_seconds(systems, rank: int) -> tuple[float, float]:
    """(seconds, reduced systems per channel) spent in `diagonalize` (eig + inv of the reduced
    m x m systems) during a single-threaded `reduce_to_modes` of every layer, divided by the
    thread count. A channel whose reduced poles need more than `rank` modes is diagonalised again
    with one state fewer, so it can count more than once."""
    spent, diagonalized = [0.0], [0]
    original = bt.diagonalize

    def timed(state, input_vec, output_vec):
        start = time.perf_counter()
        result = original(state, input_vec, output_vec)
        spent[0] += time.perf_counter() - start
        diagonalized[0] += state.shape[0]
        return result

    bt.diagonalize = timed  # `_truncate_flat` looks the function up in the module at call time
    try:
        single_threaded(lambda: [bt.reduce_to_modes(*system[:3], rank, time=TIME_DOMAIN, workers=1)
                                 for system in systems], 1)
    finally:
        bt.diagonalize = original
    channels = sum(system[0].shape[0] for system in systems)
    return spent[0] / torch.get_num_threads(), diagonalized[0] / channels


def accuracy(report) -> dict:
    """Worst channel of the compressed model (a sanity check that the timed work is the real one)."""
    relative = [error / norm if norm > 0 else 0.0 for layer in report.layers
                for error, norm in zip(layer.kernel_error, layer.kernel_norm, strict=True)]
    return {
        "max_error_bound": max(max(layer.error_bound) for layer in report.layers),
        "max_relative_kernel_error": float(f"{max(relative):.4g}"),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = make_model(args)
    log(f"model: {args.layers} layers x {args.d_model} channels x {args.d_state} modes -> rank {args.rank}, "
        f"{'bi' if args.bidirectional else 'uni'}directional, {threads} threads")

    seconds_all = []
    compressed = None
    for repeat in range(args.repeats):
        start = time.perf_counter()
        compressed = model.balanced_truncate(rank=args.rank)
        seconds_all.append(time.perf_counter() - start)
        log(f"balanced_truncate run {repeat + 1}/{args.repeats}: {seconds_all[-1]:.3f} s")
    seconds = min(seconds_all)
    if compressed.config.d_state != args.rank:
        raise RuntimeError(f"compressed model has d_state {compressed.config.d_state}, expected {args.rank}")

    # per layer, the systems exactly as compression.py builds them; reduce_to_modes as it calls it
    def layer_systems() -> list:
        return [_layer_system(index, layer.kernel, TIME_DOMAIN) for index, layer in enumerate(model.base_model.layers)]

    systems = layer_systems()
    layer_system_seconds = best_time(layer_systems, args.repeats)[0]
    per_layer = [
        best_time(lambda system=system: bt.reduce_to_modes(*system[:3], args.rank, time=TIME_DOMAIN),
                  args.repeats)[0]
        for system in systems
    ]
    log(f"reduce_to_modes per layer: {[round(value, 3) for value in per_layer]} s")
    one_layer = step_breakdown(systems[0], args.rank, args.repeats)
    one_layer = {"layer": 0, "channels": args.d_model, "reduce_to_modes": rounded(per_layer[0]), **one_layer}
    one_layer["parallel_speedup"] = round(one_layer["reduce_to_modes_serial"] / max(per_layer[0], 1e-9), 2)
    log(f"layer 0 steps: {one_layer}")
    reduce_total = sum(per_layer)
    floors = decomposition_floors(systems, args.repeats)
    rediagonalisation, diagonalized_per_channel = rediagonalisation_seconds(systems, args.rank)
    floors["rediagonalisation"] = rounded(rediagonalisation)
    floors["reduced_systems_per_channel"] = round(diagonalized_per_channel, 3)
    log(f"floors: {floors}")

    result = {
        "benchmark": "balanced_truncation",
        "n_layers": args.layers,
        "d_model": args.d_model,
        "d_state": args.d_state,
        "rank": args.rank,
        "bidirectional": args.bidirectional,
        "time": TIME_DOMAIN,
        "threads": threads,
        "quick": args.quick,
        "repeats": args.repeats,
        "seconds": rounded(seconds),
        "seconds_all": [rounded(value) for value in seconds_all],
        "target_seconds": TARGET_SECONDS,
        "meets_target": seconds <= TARGET_SECONDS,
        "floor_seconds": floors,
        "breakdown": {
            "meaning": (
                "seconds, best of `repeats`. one_layer: reduce_to_modes as balanced_truncate calls it "
                "(default workers); each pure step single-threaded, summed over the chunks reduce_to_modes "
                "splits the layer into, so steps + rest = reduce_to_modes_serial (workers=1). "
                "model_overhead = seconds - reduce_to_modes_all_layers (layer systems, kernel errors, "
                "report, new model); layer_systems_all_layers is part of it. parallel_speedup = "
                "reduce_to_modes_serial / reduce_to_modes. floor_seconds (top level): only the dense "
                "decomposition of every channel's 2N x 2N matrix L_cᵀ S L_c (one output) or L_oᵀ L_c, "
                "single-threaded time / threads: eigenvalues_only (eigvalsh / svdvals, what the Hankel "
                "singular values need) and eigendecomposition (eigh / svd, what the projectors need); "
                "rediagonalisation: time inside `diagonalize` (eig + inv of the reduced systems, "
                "reduced_systems_per_channel of them) in a single-threaded run, / threads."
            ),
            "one_layer": one_layer,
            "reduce_to_modes_per_layer": [rounded(value) for value in per_layer],
            "reduce_to_modes_all_layers": rounded(reduce_total),
            "layer_systems_all_layers": rounded(layer_system_seconds),
            "model_overhead": rounded(seconds - reduce_total),
            "model_overhead_fraction": round((seconds - reduce_total) / seconds, 3),
        },
        **accuracy(compressed.compression_report),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_cores": available_cores(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
