"""Benchmark of the Accelerate training loop's overhead (not a test).

Training throughput (samples/s) of `s4bt_hf.training.train` against a bare PyTorch loop doing the
same work: the same seeded sMNIST-like model (input_dim 1, d_model 64, 2 layers, d_state 32), the
same data (the first `--samples` images of `load_task("smnist")["train"]`, torch format,
`PadCollator`, batches of `--batch-size`, shuffled), AdamW over `ssm_param_groups`, the cosine
schedule with linear warm-up, gradient clipping at 1.0, fp32 on the CPU, one epoch. The trainer
runs without evaluation, with no checkpoint (save_every > steps), one log record (log_every >
steps) and no progress bar; each run gets a fresh, empty output folder.

The bare loop is `DataLoader(shuffle=True)` + forward / backward / clip / step / zero_grad /
schedule; its timer covers the loop only (model, optimizer and loader are built before). The
trainer's timer covers the whole `train()` call, which also holds fixed costs: the set-up before
its first batch (Accelerator, run folder, `prepare`) and the end after its last optimizer step
(log record, final `save_pretrained`, summary). Both are timed directly in every run (the first
call of the collator, a global optimizer step hook) and, less precisely, estimated from
`max_steps=1` runs with the linear model T(k) = fixed + k * step: fixed = T(1) - (T(N) - T(1)) /
(N - 1). The steady-state overhead compares T(N) minus the directly timed fixed costs (less the
bare loop's own, e.g. creating the loader's iterator) with the bare loop. Both loops run once
briefly before timing (kernels, allocator, caches), then `--repeats` times, alternating (order
swapped every repeat). Overheads come from the best runs (other processes only ever slow a run
down), with the medians' alongside, and from the median spacing of consecutive optimizer steps
(robust to a disturbed stretch of a run). Target: steady-state overhead <= 5 %.

Check that both loops do the same work: the warm-up runs feed the bare loop the trainer's sample
order; from the same initial weights both must end with the same weights (largest difference
reported). The timed bare runs shuffle with their own generator (another order, the same cost).

Prints exactly one JSON line to stdout; progress goes to stderr.

    python bench/bench_trainer.py [--samples 1024] [--batch-size 32] [--repeats 3] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench_common import available_cores, log
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from s4bt_hf import S4DSSConfig, S4DSSForSequenceClassification, ssm_param_groups
from s4bt_hf.data import PadCollator, load_task, task_info
from s4bt_hf.training import TrainingConfig, train

TARGET_PERCENT = 5.0
SEED = 0
MODEL = {"d_model": 64, "n_layers": 2, "d_state": 32}
# the trainer's defaults, used by both loops
LEARNING_RATE = TrainingConfig.learning_rate
WEIGHT_DECAY = TrainingConfig.weight_decay
WARMUP_RATIO = TrainingConfig.warmup_ratio
MAX_GRAD_NORM = TrainingConfig.max_grad_norm
WARMUP_STEPS = 3  # steps of the untimed warm-up run of each loop
QUICK = {"samples": 64, "batch_size": 16, "repeats": 1}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="training samples (one epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop, alternating")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['samples']} samples, batch {QUICK['batch_size']}, one repeat: "
                             "a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.repeats = QUICK["samples"], QUICK["batch_size"], QUICK["repeats"]
    for name in ("samples", "batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if math.ceil(args.samples / args.batch_size) < 2:
        parser.error("--samples must give at least 2 batches (the max_steps=1 estimate and the step spacing need it)")
    return args


def load_data(samples: int):
    train_split = load_task("smnist")["train"]
    if samples > len(train_split):
        raise SystemExit(f"--samples {samples}: the sMNIST train split holds only {len(train_split)} images")
    return train_split.select(range(samples)).with_format("torch")


def make_model() -> S4DSSForSequenceClassification:
    torch.manual_seed(SEED)
    info = task_info("smnist")
    config = S4DSSConfig(input_dim=info.input_dim, num_labels=info.num_labels, **MODEL)
    return S4DSSForSequenceClassification(config).train()


def trainer_order(size: int) -> list[int]:
    """The sample order of the trainer's first epoch: Accelerate's `SeedableRandomSampler` reseeds the
    loader's generator with the global seed (`set_seed(SEED)`) + epoch before its `randperm`, while a
    plain shuffling `DataLoader` first draws its worker base seed from that generator, so its order
    differs."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(SEED)).tolist()


class Stamps:
    """When a run's loader first calls the collator and when each optimizer step ends (a global
    optimizer hook: the trainer builds its optimizer inside `train`). Both loops carry the same
    instrumentation, a `perf_counter` call per batch and per step."""

    def __init__(self):
        self.first_batch: float | None = None
        self.steps: list[float] = []
        self._hook = None

    def collator(self) -> Callable[[list], dict]:
        stamps, pad = self, PadCollator()

        def collate(examples):
            if stamps.first_batch is None:
                stamps.first_batch = time.perf_counter()
            return pad(examples)

        return collate

    def __enter__(self) -> Stamps:
        self._hook = register_optimizer_step_post_hook(lambda *_: self.steps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc_info) -> None:
        self._hook.remove()


@dataclass
class Run:
    seconds: float
    model: torch.nn.Module
    before_first_batch: float  # from the start of the timer to the first collator call
    after_last_step: float  # from the end of the last optimizer step to the end of the timer
    step_intervals: list[float]  # between consecutive optimizer steps

    @classmethod
    def from_stamps(cls, start: float, end: float, model: torch.nn.Module, stamps: Stamps, steps: int) -> Run:
        if len(stamps.steps) != steps:
            raise RuntimeError(f"{len(stamps.steps)} optimizer steps, expected {steps}")
        intervals = [later - earlier for earlier, later in itertools.pairwise(stamps.steps)]
        return cls(end - start, model, stamps.first_batch - start, end - stamps.steps[-1], intervals)

    @property
    def fixed(self) -> float:
        return self.before_first_batch + self.after_last_step


def run_bare(template, dataset, batch_size: int, max_steps: int, order: list[int] | None = None) -> Run:
    """`max_steps` optimizer steps of a plain PyTorch loop; the timer covers the loop only. The loader
    shuffles with its own seeded generator, or follows `order` (a list of sample indices)."""
    model = copy.deepcopy(template).train()
    optimizer = torch.optim.AdamW(ssm_param_groups(model, LEARNING_RATE, WEIGHT_DECAY))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(WARMUP_RATIO * max_steps), max_steps)
    with Stamps() as stamps:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=order is None, sampler=order,
                            collate_fn=stamps.collator(), generator=torch.Generator().manual_seed(SEED))
        steps = 0
        start = time.perf_counter()
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            steps += 1
            if steps >= max_steps:
                break
        end = time.perf_counter()
    return Run.from_stamps(start, end, model, stamps, max_steps)


def run_trainer(template, dataset, batch_size: int, max_steps: int) -> Run:
    """One `train()` call of `max_steps` steps; the timer covers the whole call (fixed costs included)."""
    model = copy.deepcopy(template).train()
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as root, Stamps() as stamps:
        config = TrainingConfig(
            output_dir=os.path.join(root, "run"),  # fresh and empty
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            num_epochs=1,
            max_steps=max_steps,
            batch_size=batch_size,
            warmup_ratio=WARMUP_RATIO,
            max_grad_norm=MAX_GRAD_NORM,
            mixed_precision="no",
            save_every=max_steps + 1,  # never: checkpoints are only written at step < max_steps
            log_every=max_steps + 1,  # only the record of the last step
            seed=SEED,
            cpu=True,
            progress=False,
        )
        start = time.perf_counter()
        result = train(model, dataset, None, config, collate_fn=stamps.collator())
        end = time.perf_counter()
    if result.steps != max_steps:
        raise RuntimeError(f"trainer made {result.steps} steps, expected {max_steps}")
    return Run.from_stamps(start, end, model, stamps, max_steps)


def max_abs_difference(first: torch.nn.Module, second: torch.nn.Module) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters(), strict=True))


def summary(samples_per_s: list[float]) -> dict:
    return {"best": round(max(samples_per_s), 2), "median": round(statistics.median(samples_per_s), 2)}


def overhead_percent(trainer_seconds: float, bare_seconds: float) -> float:
    return round(100.0 * (trainer_seconds / bare_seconds - 1.0), 2)


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = load_average()
    if load_at_start is not None and load_at_start > 1.0:
        log(f"note: 1-minute load average {load_at_start} at the start: other processes may make the timings noisy")
    log(f"loading {args.samples} sMNIST samples")
    dataset = load_data(args.samples)
    template = make_model()
    steps = math.ceil(args.samples / args.batch_size)
    warmup_steps = min(WARMUP_STEPS, steps)

    log(f"warm-up: {warmup_steps} steps of each loop, on the same batches")
    bare_warmup = run_bare(template, dataset, args.batch_size, warmup_steps, order=trainer_order(len(dataset)))
    trainer_warmup = run_trainer(template, dataset, args.batch_size, warmup_steps)
    # same initial weights, batches and update rule: the same weights afterwards
    weights_difference = max_abs_difference(bare_warmup.model, trainer_warmup.model)
    log(f"warm-up: largest difference of the final weights {weights_difference:.3g}")

    bare: list[Run] = []
    trainer: list[Run] = []
    one_step: list[Run] = []
    for repeat in range(args.repeats):
        for name in ("bare", "trainer") if repeat % 2 == 0 else ("trainer", "bare"):
            if name == "bare":
                bare.append(run_bare(template, dataset, args.batch_size, steps))
            else:
                trainer.append(run_trainer(template, dataset, args.batch_size, steps))
        one_step.append(run_trainer(template, dataset, args.batch_size, 1))
        log(f"repeat {repeat + 1}/{args.repeats}: bare {bare[-1].seconds:.3f} s, trainer {trainer[-1].seconds:.3f} s "
            f"(fixed {trainer[-1].fixed:.3f} s), trainer max_steps=1 {one_step[-1].seconds:.3f} s")
    bare_seconds = [run.seconds for run in bare]
    trainer_seconds = [run.seconds for run in trainer]
    one_step_seconds = [run.seconds for run in one_step]
    median = statistics.median

    # fixed costs timed directly, less the bare loop's own (creating the loader's iterator, the last schedule step)
    setup = median(run.before_first_batch for run in trainer) - median(run.before_first_batch for run in bare)
    final = median(run.after_last_step for run in trainer) - median(run.after_last_step for run in bare)
    fixed = setup + final
    # the estimate from max_steps=1: T(k) = fixed + k * step through the best T(steps) and T(1)
    fixed_from_one_step = min(one_step_seconds) - (min(trainer_seconds) - min(one_step_seconds)) / (steps - 1)
    steady_seconds = [seconds - fixed for seconds in trainer_seconds]
    # spacing of consecutive optimizer steps, pooled over the repeats
    bare_step = median(interval for run in bare for interval in run.step_intervals)
    trainer_step = median(interval for run in trainer for interval in run.step_intervals)
    overhead_steady = overhead_percent(min(steady_seconds), min(bare_seconds))
    result = {
        "benchmark": "trainer_overhead",
        "device": "cpu",
        "quick": args.quick,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "steps": steps,
        "repeats": args.repeats,
        "model": {"input_dim": 1, **MODEL},
        "bare_samples_per_s": summary([args.samples / s for s in bare_seconds]),
        "trainer_samples_per_s": summary([args.samples / s for s in trainer_seconds]),
        "trainer_steady_samples_per_s": summary([args.samples / s for s in steady_seconds]),
        "bare_seconds": [round(s, 4) for s in bare_seconds],
        "trainer_seconds": [round(s, 4) for s in trainer_seconds],
        "trainer_one_step_seconds": [round(s, 4) for s in one_step_seconds],
        "trainer_fixed_seconds": round(fixed, 4),
        "trainer_fixed_parts_seconds": {"setup": round(setup, 4), "final": round(final, 4)},
        "trainer_fixed_seconds_from_one_step": round(fixed_from_one_step, 4),
        "overhead_percent_raw": overhead_percent(min(trainer_seconds), min(bare_seconds)),
        "overhead_percent_steady": overhead_steady,
        "overhead_percent_raw_median": overhead_percent(median(trainer_seconds), median(bare_seconds)),
        "overhead_percent_steady_median": overhead_percent(median(steady_seconds), median(bare_seconds)),
        "step_seconds_median": {"bare": round(bare_step, 5), "trainer": round(trainer_step, 5)},
        "overhead_percent_per_step": overhead_percent(trainer_step, bare_step),
        "overhead_meaning": "100 * (trainer time / bare time - 1): raw and steady from the best runs (_median: from "
                            "the median runs); steady: trainer time - trainer_fixed_seconds (set-up before the first "
                            "batch + end after the last step, timed, less the bare loop's); per_step: median spacing "
                            "of consecutive optimizer steps",
        "target_percent": TARGET_PERCENT,
        "meets_target": overhead_steady <= TARGET_PERCENT,
        "warmup_weights_max_abs_diff": weights_difference,
        "load_average": {"start": load_at_start, "end": load_average()},
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
