"""Speed of shrunk models (not a test): what the removed states buy.

An original S4-DSS classifier (`--model`, a saved one; by default a freshly initialised 4 x 64,
N = 64 model) against its reduced versions: `model.reduce("balanced_truncation", budget=...)` at
each `--budgets` fraction of the original's complex modes, and any saved reduced models given with
`--shrunk`. For every model, in the same run:
    whole_sequence        eager forward of a (batch, length) batch, no grad, eval mode;
    streaming_step_batch_1, streaming_step_batch
                          one step of `model.streaming_module()` (real arithmetic, explicit
                          states), timed over `--steps` positions at batch 1 and at `--batch`
                          (the second only when `--batch` > 1);
    whole_sequence_onnxruntime
                          the whole-sequence ONNX export (`export_model(..., whole_sequence=True)`)
                          run in onnxruntime on the same batch (skip with `--no-onnx`).
Each time is the median over `--repeats` rounds; a round measures every variant of every model
one model after the other, so the machine's load hits all models alike: compare the ratios
(`speedup`: the original's time over the model's) within one run. `--accuracy-json` (a JSON
object, model label -> accuracy) puts accuracies next to the speeds. Prints one JSON line to
stdout; progress goes to stderr.

    python bench/bench_shrunk_speed.py [--model runs/.../final] [--shrunk PATH ...]
                                       [--budgets 0.5 0.25 ...] [--accuracy-json FILE] [--no-onnx]
                                       [--repeats 3] [--threads 1] [--length 784] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from bench_common import available_cores, log

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification
from s4bt_hf.compression import ssm_parameter_count

DEFAULT_BUDGETS = (0.5, 0.25, 0.125, 0.0625, 0.03125)
WARMUP_STEPS = 10
ORIGINAL = "original"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved S4DSSForSequenceClassification (default: a fresh model, "
                                        "--d-model x --n-layers x --d-state)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--shrunk", nargs="*", default=[], metavar="PATH",
                        help="saved reduced models of the original (labelled by their path as given)")
    parser.add_argument("--budgets", nargs="*", type=float, default=list(DEFAULT_BUDGETS), metavar="FRACTION",
                        help="fractions of the original's complex modes kept by balanced truncation "
                             "(labelled bt_<fraction>); none: only --shrunk")
    parser.add_argument("--accuracy-json", help="a JSON object: model label -> accuracy, reported beside the speeds")
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, help="streamed positions per measurement (default: --length)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--no-onnx", action="store_true", help="skip the whole-sequence ONNX export")
    args = parser.parse_args()
    for name in ("d_model", "n_layers", "d_state", "length", "batch", "steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0 < fraction <= 1 for fraction in args.budgets):
        parser.error(f"--budgets are fractions in (0, 1], got {args.budgets}")
    if not args.budgets and not args.shrunk:
        parser.error("nothing to compare: give --budgets or --shrunk")
    if args.steps is None:
        args.steps = args.length
    return args


def ssm_modes(model) -> int:
    """Complex modes of the whole model, Σ_layers d_model · d_state (what a budget counts)."""
    return model.config.d_model * sum(model.config.layer_d_states)


def load_original(args) -> tuple[S4DSSForSequenceClassification, str]:
    if args.model:
        return S4DSSForSequenceClassification.from_pretrained(args.model).eval(), args.model
    torch.manual_seed(0)
    config = S4DSSConfig(input_dim=1, d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                         num_labels=10)
    return S4DSSForSequenceClassification(config).eval(), "freshly initialised (seed 0)"


def reduced_models(original, args) -> dict[str, dict]:
    """label -> {"model", "source", ...}: the budget reductions, then the saved ones."""
    total = ssm_modes(original)
    smallest = original.config.d_model * original.config.n_layers  # one mode per channel per layer
    models = {}
    for fraction in dict.fromkeys(args.budgets):  # each fraction once
        budget = int(fraction * total)
        if budget < smallest:
            raise SystemExit(f"--budgets {fraction:g}: {budget} of {total} modes is less than one mode per channel "
                             f"per layer ({smallest})")
        log(f"reducing to {budget} of {total} modes ...")
        start = time.perf_counter()
        model = original.reduce("balanced_truncation", budget=budget).eval()
        models[f"bt_{fraction:g}"] = {"model": model, "source": f"balanced_truncation, budget {budget} modes",
                                      "reduce_s": round(time.perf_counter() - start, 2)}
    for path in args.shrunk:
        if path in models or path == ORIGINAL:
            raise SystemExit(f"--shrunk {path}: a second model with this label")
        model = S4DSSForSequenceClassification.from_pretrained(path).eval()
        for field in ("vocab_size", "input_dim", "d_model", "n_layers", "num_labels", "bidirectional"):
            if getattr(model.config, field) != getattr(original.config, field):
                raise SystemExit(f"--shrunk {path}: {field} {getattr(model.config, field)!r} differs from the "
                                 f"original's {getattr(original.config, field)!r}; not a reduction of it")
        report = getattr(model, "compression_report", None)
        method = getattr(report, "method", None)
        models[path] = {"model": model, "source": f"saved{f', {method}' if method else ''}"}
    return models


def sequence_inputs(config, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    if config.vocab_size is not None:
        return torch.randint(config.vocab_size, (batch, length), generator=generator)
    return torch.randn(batch, length, config.input_dim, generator=generator)


def forward_kwargs(config, inputs: torch.Tensor) -> dict:
    return {"input_ids": inputs} if config.vocab_size is not None else {"input_values": inputs}


def timed_ms(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e3


def whole_sequence(model, inputs: torch.Tensor):
    """Milliseconds of one eager forward of `inputs`."""
    kwargs = forward_kwargs(model.config, inputs if model.config.vocab_size is not None else inputs.to(model.dtype))

    def run() -> float:
        with torch.no_grad():
            return timed_ms(lambda: model(**kwargs))

    return run


def streaming(module, positions: torch.Tensor):
    """Milliseconds per step of `module` over `positions` (steps, batch, ...), after a warm-up."""
    batch = positions.shape[1]
    positions = positions.to(module.input_dtype)

    def run() -> float:
        with torch.no_grad():
            state = module.initial_state(batch)
            for position in positions[:WARMUP_STEPS]:
                _, *state = module(position, *state)
            start = time.perf_counter()
            for position in positions[WARMUP_STEPS:]:
                _, *state = module(position, *state)
            return (time.perf_counter() - start) * 1e3 / (positions.shape[0] - WARMUP_STEPS)

    return run


def onnx_session(model, folder: str, threads: int):
    import onnxruntime

    from s4bt_hf.export import export_model

    export_model(model, folder, format="onnx", whole_sequence=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                        providers=["CPUExecutionProvider"])


def facts(model, original_modes: int) -> dict:
    modes = ssm_modes(model)
    return {"d_state": model.config.layer_d_states, "ssm_modes": modes,
            "ssm_modes_fraction": round(modes / original_modes, 5),
            "ssm_parameters": ssm_parameter_count(model),
            "parameters": sum(parameter.numel() for parameter in model.parameters())}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    original, source = load_original(args)
    if original.config.bidirectional:
        raise SystemExit("a bidirectional model cannot stream; this benchmark times streaming too")
    accuracy = None
    if args.accuracy_json:
        with open(args.accuracy_json, encoding="utf-8") as handle:
            accuracy = json.load(handle)
        if not isinstance(accuracy, dict):
            raise SystemExit(f"--accuracy-json {args.accuracy_json}: expected a JSON object (label -> accuracy)")
    entries = {ORIGINAL: {"model": original, "source": source}, **reduced_models(original, args)}
    if accuracy is not None:
        unknown = sorted(set(accuracy) - set(entries))
        if unknown:
            log(f"--accuracy-json: no model is labelled {unknown}; labels are {list(entries)}")

    generator = torch.Generator().manual_seed(0)
    inputs = sequence_inputs(original.config, args.batch, args.length, generator)
    steps = sequence_inputs(original.config, args.batch, args.steps + WARMUP_STEPS, generator).transpose(0, 1)
    steps = steps.contiguous()
    variants = {label: {} for label in entries}  # label -> name -> zero-argument function returning ms
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, entry) in enumerate(entries.items()):
            model = entry["model"]
            module = model.streaming_module()
            variants[label]["whole_sequence"] = whole_sequence(model, inputs)
            variants[label]["streaming_step_batch_1"] = streaming(module, steps[:, :1])
            if args.batch > 1:
                variants[label]["streaming_step_batch"] = streaming(module, steps)
            if not args.no_onnx:
                log(f"exporting {label} ...")
                start = time.perf_counter()
                session = onnx_session(model, os.path.join(scratch, f"model-{index}"), args.threads)
                entry["onnx_export_s"] = round(time.perf_counter() - start, 2)
                mask = torch.ones(inputs.shape[:2], dtype=torch.int64)
                feed = {"inputs": inputs.numpy(), "attention_mask": mask.numpy()}
                variants[label]["whole_sequence_onnxruntime"] = (
                    lambda session=session, feed=feed: timed_ms(lambda: session.run(None, feed)))
        for functions in variants.values():  # warm-up (first calls allocate, build caches)
            for function in functions.values():
                function()
        names = list(variants[ORIGINAL])
        samples = {label: {name: [] for name in names} for label in variants}
        for repeat in range(args.repeats):
            for name in names:
                for label, functions in variants.items():
                    samples[label][name].append(functions[name]())
            log(f"round {repeat + 1}/{args.repeats} done")

    original_modes = ssm_modes(original)
    medians = {label: {name: statistics.median(values) for name, values in by_name.items()}
               for label, by_name in samples.items()}
    models = {}
    for label, entry in entries.items():
        row = {"source": entry["source"], **facts(entry["model"], original_modes)}
        row.update({key: entry[key] for key in ("reduce_s", "onnx_export_s") if key in entry})
        if accuracy is not None:
            row["accuracy"] = accuracy.get(label)
        row["ms"] = {name: round(value, 4) for name, value in medians[label].items()}
        row["speedup"] = {name: round(medians[ORIGINAL][name] / value, 3) for name, value in medians[label].items()}
        models[label] = row
        log(f"{label}: modes {row['ssm_modes']}, ms {row['ms']}, speedup {row['speedup']}")

    result = {
        "benchmark": "shrunk_speed",
        "meaning": ("ms: median over `repeats` interleaved rounds; whole_sequence*: one forward of (batch, "
                    "length); streaming_step_batch_1 / streaming_step_batch: one step of streaming_module() at "
                    "batch 1 / `batch`, averaged over `steps` positions. speedup: the original's median over the "
                    "model's (> 1: faster). ssm_modes: complex modes Σ_layers d_model · d_state; ssm_parameters: "
                    "parameters of the DSS kernels."),
        "original": {"source": source, "d_model": original.config.d_model, "n_layers": original.config.n_layers,
                     "d_state": original.config.layer_d_states,
                     "input": ("input_ids" if original.config.vocab_size is not None else "input_values")},
        "length": args.length,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "onnx": not args.no_onnx,
        "models": models,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_cores": available_cores(),
        "torch": torch.__version__,
    }
    if not args.no_onnx:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
