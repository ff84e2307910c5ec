"""The paper's experiment in one command (`s4bt reproduce`, `make reproduce`).

Ezoe & Sato: train an S4 model of DSS layers, compress every layer by balanced truncation,
retrain the smaller model from the reduced parameters ("main training"), and compare it with a
model of the same size trained from Skew-HiPPO initialisation; originals of different quality
test whether a better original gives a better compressed model.

Stages, each cached in `<output>/stages/<name>-<hash of its configuration>/result.json` (`stage_cache.py`; a
re-run skips finished stages; an interrupted training resumes from its checkpoints):

    pretrain   one original per entry of `originals` (seed, epochs), d_state = N
    compress   every original to every rank: accuracy right after truncation, HSVs
    retrain    main training of every compressed model from its reduced parameters
    baseline   the same architecture with d_state = rank, Skew-HiPPO, the same budget and seeds

and, with `compression_aware` (`CompressionAware`, `s4bt reproduce --compression-aware`):

    hankel-pretrain  originals trained with the Hankel penalty (λ grid on the first seed, then λ*)
    hankel-reduce    those reduced to every rank by balanced truncation, not retrained
    hankel-peers     (with `peer_comparison`) their states removed at <= 0.5 / 1 point
    reduce-during    new models reduced to each rank (of `in_training_ranks`) during training (the
                     BT arm's total epochs)

and, with a budget's `peer_comparison` / `shrink_drops` (`--budget strong`; `field_metric.py`):

    peers            every method, LAST and AIRE included: states removed at <= 0.5 / 1 point
    shrink           `model.shrink` of every original at each drop

Outputs in `<output>`: results.json, results.md (the table), hsv_decay.png, accuracy_vs_params.png,
original_vs_compressed.png, states_vs_accuracy.png (with `peer_comparison`), and models/bt_r<rank>/
(the retrained compressed model of the best original, with its model card). Task facts (model
inputs, data description, budgets) come from the task registry (`s4bt_hf.data.TASK_INFOS`); the
stage cache keys do not depend on them.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..compression import ssm_parameter_count
from ..configuration_s4dss import S4DSSConfig
from ..data import TaskInfo, load_task, task_info
from ..data.collate import PadCollator
from ..model_card import render_model_card
from ..modeling_s4dss import S4DSSForSequenceClassification
from ..reduction_methods import REDUCTION_METHODS
from ..training import ReductionSchedule, TrainingConfig, evaluate_dataset, train
from .field_metric import (
    collect_peers,
    collect_regularised_peers,
    field_metric_tables,
    peer_stage,
    regularised_peer_stage,
    shrink_stages,
)
from .stage_cache import StageCache


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
    # the field's metric on the same originals (`field_metric.py`): every method, LAST and AIRE
    # included, over a budget grid (states removed at <= 0.5 / 1 point), and `shrink` at these drops
    peer_comparison: bool = False
    shrink_drops: list[float] = field(default_factory=list)


def default_budgets(task: str) -> dict[str, Budget]:
    """The task's budgets, from the task registry (`TaskInfo.budgets`): `cpu` runs on 2 CPU cores
    (sMNIST: about 15 minutes), `paper` is the LRA-scale recipe, meant for a GPU."""
    return {name: Budget(**copy.deepcopy(fields)) for name, fields in task_info(task).budgets.items()}


@dataclass(frozen=True)
class CompressionAware:
    """The compression-aware arms (`s4bt reproduce --compression-aware`), next to the others:

    (a) Hankel-regularised originals: the same seeds, epochs and recipe as the originals, trained
        with `hankel_weight` λ (the penalty every `hankel_every` steps, its last gradient applied
        in between with `hankel_reuse`, or weighted `hankel_every` times without), then
        reduced by balanced truncation to every rank WITHOUT retraining. λ is chosen from
        `hankel_weights` on the VALIDATION split, on the first original's seed only: the λ whose
        rank-`selection_rank` reduction has the best validation accuracy among those whose
        original is within `tolerance` of the unregularised original's validation accuracy (if
        none is, the λ with the best original);
        The same originals are also reduced by each of `other_methods` (`REDUCTION_METHODS`),
        without retraining, for comparison; λ is chosen with balanced truncation only.
        With the budget's `peer_comparison`, each regularised original also gets the peers'
        curves and the states removed at <= 0.5 / 1 point (`regularised_peer_stage`).
    (b) reduction during training (`ReductionSchedule(at=reduce_at, rank=r)`): a new N-mode model
        of each seed trained for as many epochs as the BT arm's pre-training and main training
        together, reduced to rank r after the fraction `reduce_at` of the run; r runs over
        `in_training_ranks` (None: every rank of the budget; empty: no such arm).
    """

    hankel_weights: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    hankel_every: int = 4
    hankel_reuse: bool = True  # the regularisation of every step at the cost of one in `hankel_every`
    other_methods: tuple[str, ...] = ("singular_perturbation",)
    selection_rank: int | None = None  # None: the middle of the ranks (8 of 2, 4, 8, 16)
    tolerance: float = 0.01
    reduce_at: float = 0.1
    in_training_ranks: tuple[int, ...] | None = None

    def __post_init__(self):
        weights = tuple(self.hankel_weights)
        if not weights or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                              or w <= 0 for w in weights):
            raise ValueError(f"CompressionAware: `hankel_weights` must be positive finite numbers, got {weights!r}.")
        object.__setattr__(self, "hankel_weights", weights)
        if isinstance(self.hankel_every, bool) or not isinstance(self.hankel_every, int) or self.hankel_every < 1:
            raise ValueError(f"CompressionAware: `hankel_every` must be an int >= 1, got {self.hankel_every!r}.")
        if not isinstance(self.hankel_reuse, bool):
            raise ValueError(f"CompressionAware: `hankel_reuse` must be True or False, got {self.hankel_reuse!r}.")
        methods = tuple(self.other_methods)
        unknown = [method for method in methods if method not in REDUCTION_METHODS or method == "balanced_truncation"]
        if unknown:
            raise ValueError(f"CompressionAware: `other_methods` must name reduction methods other than balanced "
                             f"truncation ({', '.join(m for m in REDUCTION_METHODS if m != 'balanced_truncation')}), "
                             f"got {unknown!r}.")
        object.__setattr__(self, "other_methods", methods)
        if not (isinstance(self.tolerance, (int, float)) and 0 <= self.tolerance <= 1):
            raise ValueError(f"CompressionAware: `tolerance` must be in [0, 1], got {self.tolerance!r}.")
        if not (isinstance(self.reduce_at, float) and 0 < self.reduce_at < 1):
            raise ValueError(f"CompressionAware: `reduce_at` must be a fraction in (0, 1), got {self.reduce_at!r}.")
        if self.in_training_ranks is not None:
            ranks = tuple(self.in_training_ranks)
            if any(isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 for rank in ranks):
                raise ValueError(f"CompressionAware: `in_training_ranks` must be ints >= 1, got {ranks!r}.")
            object.__setattr__(self, "in_training_ranks", ranks)

    def rank_for_selection(self, ranks: list[int]) -> int:
        return self.selection_rank if self.selection_rank is not None else sorted(ranks)[len(ranks) // 2]

    def ranks_in_training(self, ranks: list[int]) -> list[int]:
        return list(ranks) if self.in_training_ranks is None else list(self.in_training_ranks)


@dataclass
class _Experiment:
    """What every stage of one run shares: the task, budget, data and stage cache."""

    task: str
    output: str  # absolute path
    budget: Budget
    info: TaskInfo
    splits: object  # the DatasetDict, torch format
    cache: StageCache
    progress: bool
    log: Callable[[str], None]

    @property
    def collate(self) -> PadCollator:
        return PadCollator(self.info.pad_token_id or 0)

    @property
    def common(self) -> dict:
        """Part of every training stage's cache key: the data."""
        return {"task": self.task, "data": self.budget.data, "train_samples": self.budget.train_samples}

    @property
    def recipe(self) -> dict:
        """The training recipe in every training stage's cache key: the budget less what varies by stage."""
        return {key: value for key, value in asdict(self.budget).items()
                if key not in ("ranks", "originals", "main_epochs", "equal_total_ranks", "peer_comparison",
                               "shrink_drops")}

    def stage(self, name: str, config: dict, work, **arguments) -> dict:
        """Run (or read back) a cached stage; `work(folder, **arguments)` computes it."""
        return self.cache.run(name, config, functools.partial(work, **arguments), self.log)

    def model_config(self, d_state: int) -> S4DSSConfig:
        budget = self.budget
        return S4DSSConfig(**self.info.model_inputs(), num_labels=self.info.num_labels, d_model=budget.d_model,
                           n_layers=budget.n_layers, d_state=d_state, norm=budget.norm, prenorm=budget.prenorm,
                           dropout=budget.dropout, bidirectional=budget.bidirectional, ssm_lr=budget.ssm_lr)

    def training(self, folder: str, seed: int, epochs: int, **options) -> TrainingConfig:
        budget = self.budget
        return TrainingConfig(output_dir=os.path.join(folder, "run"), learning_rate=budget.learning_rate,
                              weight_decay=budget.weight_decay, num_epochs=epochs, batch_size=budget.batch_size,
                              eval_batch_size=budget.eval_batch_size, warmup_ratio=budget.warmup_ratio,
                              mixed_precision=budget.mixed_precision, seed=seed, progress=self.progress, **options)

    def train_and_test(self, folder: str, model, seed: int, epochs: int, **options) -> dict:
        """Train `model`, then test the best checkpoint (by validation accuracy)."""
        result = train(model, self.splits["train"], self.splits["validation"],
                       self.training(folder, seed, epochs, **options), self.collate)
        best = S4DSSForSequenceClassification.from_pretrained(os.path.join(folder, "run", "best"),
                                                              dtype=torch.float32)
        test = evaluate_dataset(best, self.splits["test"], self.budget.eval_batch_size, self.collate)
        return {"validation_accuracy": result.best_accuracy, "test_accuracy": test["accuracy"],
                "model": os.path.join(folder, "run", "best"), "ssm_parameters": ssm_parameter_count(best),
                "total_parameters": sum(p.numel() for p in best.parameters())}

    def train_new(self, folder: str, d_state: int, seed: int, epochs: int, **options) -> dict:
        """A new model (Skew-HiPPO, initialised from `seed`) trained for `epochs`."""
        torch.manual_seed(seed)
        return self.train_and_test(folder, S4DSSForSequenceClassification(self.model_config(d_state)), seed, epochs,
                                   **options)

    def train_saved(self, folder: str, path: str, seed: int, epochs: int) -> dict:
        """A saved (compressed) model trained on from its weights."""
        model = S4DSSForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        return self.train_and_test(folder, model, seed, epochs)


def reproduce(task: str = "smnist", output: str = "runs/reproduce", budget: str | Budget = "cpu",
              progress: bool = True, log=print, budget_name: str | None = None,
              compression_aware: CompressionAware | None = None) -> dict:
    """Run (or finish) the whole experiment and write its outputs; returns the results dict.
    `compression_aware` adds the arms of `CompressionAware` (off by default)."""
    budget, budget_name = _resolve_budget(task, budget, budget_name)
    _check_budget(budget, compression_aware)
    experiment = _prepare(task, output, budget, progress, log)
    originals, peer_results, shrink_rows = [], [], []
    for seed, epochs in budget.originals:  # each original measured as soon as it is trained
        originals.append(_pretrain(experiment, seed, epochs))
        if budget.peer_comparison:
            peer_results.append(peer_stage(experiment, seed, epochs, originals[-1]))
        shrink_rows += shrink_stages(experiment, seed, epochs, originals[-1])
    peers = collect_peers(peer_results) if peer_results else None
    if compression_aware is not None:  # right after the originals, which is all they need
        hankel = _hankel_arm(experiment, compression_aware, originals, peer_results)
        in_training = _in_training_arm(experiment, compression_aware)
    rows = _compress_and_retrain(experiment, originals)
    baselines = _train_baselines(experiment)
    equal_total = _train_equal_total_baselines(experiment)
    results = _summarise(task, budget_name, budget, originals, rows, baselines, equal_total)
    if peers is not None:
        results["peers"] = peers
    if shrink_rows:
        results["shrink"] = [{key: value for key, value in row.items() if key != "report"} for row in shrink_rows]
    regularised_rows = []
    if compression_aware is not None:
        _summarise_compression_aware(results, compression_aware, hankel, in_training)
        regularised_rows = hankel["rows"]
        if hankel["peers"] is not None:
            results["compression_aware"]["peers"] = hankel["peers"]
    _write_outputs(experiment.output, results, rows, budget, task, regularised_rows)
    return results


def _resolve_budget(task: str, budget: str | Budget, budget_name: str | None) -> tuple[Budget, str]:
    if isinstance(budget, str):
        budgets = default_budgets(task)
        if budget not in budgets:
            raise ValueError(f"unknown budget {budget!r}; known: {', '.join(budgets)}")
        return budgets[budget], budget
    return budget, budget_name or "custom"


def _prepare(task: str, output: str, budget: Budget, progress: bool, log) -> _Experiment:
    """The data and the stage cache of a run (the output folder is created)."""
    info = task_info(task)
    output = os.path.abspath(output)  # stage results hold paths: the same from any working directory
    os.makedirs(output, exist_ok=True)
    splits = load_task(task, **budget.data).with_format("torch")
    if budget.train_samples is not None:
        splits["train"] = splits["train"].select(range(min(budget.train_samples, len(splits["train"]))))
    return _Experiment(task, output, budget, info, splits, StageCache(output), progress, log)


def _pretrain(experiment: _Experiment, seed: int, epochs: int, hankel_weight: float | None = None,
              hankel_every: int = 1, hankel_reuse: bool = False) -> dict:
    """One original of d_state N; with `hankel_weight`, trained with the Hankel penalty."""
    budget = experiment.budget
    config = {**experiment.common, "recipe": experiment.recipe, "seed": seed, "epochs": epochs,
              "d_state": budget.d_state}
    if hankel_weight is None:
        return experiment.stage(f"pretrain-s{seed}-e{epochs}", config, experiment.train_new, d_state=budget.d_state,
                                seed=seed, epochs=epochs)
    config.update(hankel_weight=hankel_weight, hankel_every=hankel_every)
    if hankel_reuse:  # in the key only when on: the stages trained before the option existed keep theirs
        config["hankel_reuse"] = True
    return experiment.stage(f"hankel-pretrain-s{seed}-e{epochs}-w{hankel_weight:g}", config, experiment.train_new,
                            d_state=budget.d_state, seed=seed, epochs=epochs, hankel_weight=hankel_weight,
                            hankel_every=hankel_every, hankel_reuse=hankel_reuse)


def _compress_and_retrain(experiment: _Experiment, originals: list[dict]) -> list[dict]:
    """Every original truncated to every rank (accuracy right after truncation), then retrained."""
    budget = experiment.budget
    rows = []
    for (seed, epochs), original in zip(budget.originals, originals, strict=True):
        for rank in budget.ranks:
            # upstream stages by their cache key (folder name), not by path
            compressed = experiment.stage(
                f"compress-s{seed}-e{epochs}-r{rank}", {"original": os.path.basename(original["folder"]), "rank": rank},
                _compress, experiment=experiment, original=original, rank=rank)
            retrain_config = {"compressed": os.path.basename(compressed["folder"]), "recipe": experiment.recipe,
                              "seed": seed, "epochs": budget.main_epochs}
            retrained = experiment.stage(f"retrain-s{seed}-e{epochs}-r{rank}", retrain_config, experiment.train_saved,
                                         path=compressed["model"], seed=seed, epochs=budget.main_epochs)
            rows.append({"seed": seed, "pretrain_epochs": epochs, "rank": rank,
                         "original_test_accuracy": original["test_accuracy"],
                         "truncated_test_accuracy": compressed["test_accuracy"],
                         "bt_retrained_test_accuracy": retrained["test_accuracy"],
                         "ssm_parameters": retrained["ssm_parameters"],
                         "total_parameters": retrained["total_parameters"],
                         "bt_model": retrained["model"], "hsv": compressed["hsv"]})
    return rows


def _baseline(experiment: _Experiment, seed: int, rank: int, epochs: int, name: str) -> dict:
    """A Skew-HiPPO model with d_state = rank, trained from scratch for `epochs`."""
    config = {**experiment.common, "recipe": experiment.recipe, "seed": seed, "epochs": epochs, "d_state": rank,
              "init": "skew_hippo"}
    return experiment.stage(name, config, experiment.train_new, d_state=rank, seed=seed, epochs=epochs)


def _train_baselines(experiment: _Experiment) -> list[dict]:
    """The same budget as main training, at every rank and seed."""
    budget = experiment.budget
    baselines = []
    for seed, _ in budget.originals:
        for rank in budget.ranks:
            result = _baseline(experiment, seed, rank, budget.main_epochs, f"baseline-s{seed}-r{rank}")
            baselines.append({"seed": seed, "rank": rank, "test_accuracy": result["test_accuracy"],
                              "ssm_parameters": result["ssm_parameters"],
                              "total_parameters": result["total_parameters"]})
    return baselines


def _train_equal_total_baselines(experiment: _Experiment) -> list[dict]:
    """As many epochs as the BT arm in total (its original's pre-training + main training)."""
    budget = experiment.budget
    equal_total = []
    for seed, epochs in budget.originals:
        for rank in budget.equal_total_ranks:
            total = epochs + budget.main_epochs
            result = _baseline(experiment, seed, rank, total, f"baseline-s{seed}-e{total}-r{rank}")
            equal_total.append({"seed": seed, "rank": rank, "epochs": total, "test_accuracy": result["test_accuracy"]})
    return equal_total


def _hankel_reduce(experiment: _Experiment, seed: int, epochs: int, weight: float, original: dict,
                   rank: int, method: str = "balanced_truncation") -> dict:
    """A Hankel-regularised original reduced to `rank` by `method`, not retrained: validation and
    test accuracy."""
    config = {"original": os.path.basename(original["folder"]), "rank": rank, "method": method}
    suffix = "" if method == "balanced_truncation" else f"-{method}"  # balanced truncation keeps its stage names
    return experiment.stage(f"hankel-reduce-s{seed}-e{epochs}-w{weight:g}-r{rank}{suffix}", config, _compress,
                            experiment=experiment, original=original, rank=rank, with_validation=True,
                            method=method)


def choose_hankel_weight(grid: list[dict], reference_accuracy: float, tolerance: float) -> float:
    """The λ of `grid` (entries: weight, original_validation_accuracy, reduced_validation_accuracy)
    whose reduction is best on validation, among those whose original is within `tolerance` of
    `reference_accuracy` (the unregularised original's); if none is, the λ of the best original.
    Ties go to the smaller λ. Marks each entry `eligible`."""
    for entry in grid:
        entry["eligible"] = entry["original_validation_accuracy"] >= reference_accuracy - tolerance - 1e-12
    eligible = [entry for entry in grid if entry["eligible"]]
    if eligible:
        best = max(eligible, key=lambda entry: (entry["reduced_validation_accuracy"], -entry["weight"]))
    else:
        best = max(grid, key=lambda entry: (entry["original_validation_accuracy"], -entry["weight"]))
    return best["weight"]


def _hankel_arm(experiment: _Experiment, settings: CompressionAware, originals: list[dict],
                plain_peers: list[dict]) -> dict:
    """Arm (a): λ chosen on seed 0's validation split, then every seed trained with it and reduced
    to every rank without retraining (with the budget's `peer_comparison`, also to its grid of
    model-wide budgets by every balanced method and the peers: `regularised_peer_stage`)."""
    budget = experiment.budget
    selection_rank = settings.rank_for_selection(budget.ranks)
    (seed, epochs), reference = budget.originals[0], originals[0]
    grid = []
    for weight in settings.hankel_weights:
        original = _pretrain(experiment, seed, epochs, weight, settings.hankel_every, settings.hankel_reuse)
        reduced = _hankel_reduce(experiment, seed, epochs, weight, original, selection_rank)
        grid.append({"weight": weight, "original_validation_accuracy": original["validation_accuracy"],
                     "reduced_validation_accuracy": reduced["validation_accuracy"]})
    chosen = choose_hankel_weight(grid, reference["validation_accuracy"], settings.tolerance)
    selection = {"seed": seed, "epochs": epochs, "rank": selection_rank, "tolerance": settings.tolerance,
                 "unregularised_validation_accuracy": reference["validation_accuracy"], "grid": grid,
                 "chosen_weight": chosen}
    experiment.log(f"hankel weight chosen on validation: {chosen:g} (grid {grid})")
    rows, other_rows, models, peer_results = [], [], [], []
    for (seed, epochs), plain in zip(budget.originals, originals, strict=True):
        original = _pretrain(experiment, seed, epochs, chosen, settings.hankel_every, settings.hankel_reuse)
        if budget.peer_comparison:
            peer_results.append(regularised_peer_stage(experiment, seed, epochs, chosen, original))
        models.append({"seed": seed, "epochs": epochs, "hankel_weight": chosen,
                       "validation_accuracy": original["validation_accuracy"],
                       "test_accuracy": original["test_accuracy"],
                       "unregularised_test_accuracy": plain["test_accuracy"]})
        for rank in budget.ranks:
            for method in ("balanced_truncation", *settings.other_methods):
                reduced = _hankel_reduce(experiment, seed, epochs, chosen, original, rank, method)
                row = {"seed": seed, "pretrain_epochs": epochs, "rank": rank, "hankel_weight": chosen,
                       "original_test_accuracy": original["test_accuracy"],
                       "reduced_test_accuracy": reduced["test_accuracy"],
                       "keep_ratio": reduced["test_accuracy"] / original["test_accuracy"]
                       if original["test_accuracy"] > 0 else None}
                if method == "balanced_truncation":
                    rows.append({**row, "hsv": reduced["hsv"]})
                else:
                    other_rows.append({**row, "method": method})
    peers = collect_regularised_peers(peer_results, chosen, plain_peers) if peer_results else None
    return {"selection": selection, "rows": rows, "other_rows": other_rows, "originals": models, "peers": peers}


def _in_training_arm(experiment: _Experiment, settings: CompressionAware) -> list[dict]:
    """Arm (b): a new N-mode model per seed, reduced to each rank of `in_training_ranks` during
    training, with the BT arm's total number of epochs (its original's pre-training + main training)."""
    budget = experiment.budget
    rows = []
    for seed, epochs in budget.originals:
        total = epochs + budget.main_epochs
        for rank in settings.ranks_in_training(budget.ranks):
            schedule = ReductionSchedule(at=settings.reduce_at, rank=rank)
            config = {**experiment.common, "recipe": experiment.recipe, "seed": seed, "epochs": total,
                      "d_state": budget.d_state, "reduction": schedule.to_dict()}
            result = experiment.stage(f"reduce-during-s{seed}-e{total}-r{rank}", config, experiment.train_new,
                                      d_state=budget.d_state, seed=seed, epochs=total, reduction=schedule)
            rows.append({"seed": seed, "rank": rank, "epochs": total, "test_accuracy": result["test_accuracy"],
                         "validation_accuracy": result["validation_accuracy"],
                         "ssm_parameters": result["ssm_parameters"]})
    return rows


def _check_budget(budget: Budget, compression_aware: CompressionAware | None = None) -> None:
    if not budget.ranks or any(not 1 <= rank <= budget.d_state for rank in budget.ranks):
        raise ValueError(f"ranks must lie in [1, d_state={budget.d_state}], got {budget.ranks}")
    if any(rank not in budget.ranks for rank in budget.equal_total_ranks):
        raise ValueError(f"equal_total_ranks {budget.equal_total_ranks} must be among the ranks {budget.ranks}")
    if len(budget.originals) < 1:
        raise ValueError("at least one original is needed")
    if compression_aware is not None and not 1 <= compression_aware.rank_for_selection(budget.ranks) <= budget.d_state:
        raise ValueError(f"the rank that selects the Hankel weight must lie in [1, d_state={budget.d_state}], got "
                         f"{compression_aware.selection_rank}")
    if compression_aware is not None and any(rank not in budget.ranks
                                             for rank in compression_aware.ranks_in_training(budget.ranks)):
        raise ValueError(f"in_training_ranks {list(compression_aware.in_training_ranks)} must be among the ranks "
                         f"{budget.ranks}")


def _compress(folder: str, experiment: _Experiment, original: dict, rank: int, with_validation: bool = False,
              method: str = "balanced_truncation") -> dict:
    """Balanced truncation (or another `method`) of a trained original to `rank`, tested without
    retraining (and validated, for choices made on the validation split)."""
    model = S4DSSForSequenceClassification.from_pretrained(original["model"], dtype=torch.float32)
    compressed = model.reduce(method=method, rank=rank)
    path = os.path.join(folder, "model")
    if os.path.exists(path):  # a half-written model from an interrupted run
        shutil.rmtree(path)
    compressed.save_pretrained(path)
    batch_size, collate = experiment.budget.eval_batch_size, experiment.collate
    test = evaluate_dataset(compressed, experiment.splits["test"], batch_size, collate)
    report = compressed.compression_report
    # the HSV spectrum per layer: mean over channels, normalised by each channel's largest value
    hsv = []
    for layer in report.layers:
        values = torch.tensor(layer.hankel_singular_values, dtype=torch.float64)
        hsv.append((values / values[:, :1].clamp_min(1e-300)).mean(0).tolist())
    result = {"test_accuracy": test["accuracy"], "model": path, "hsv": hsv,
              "kept_energy": [layer.layer_kept_energy for layer in report.layers],
              "max_relative_kernel_error": max(layer.max_relative_kernel_error for layer in report.layers)}
    if with_validation:
        result["validation_accuracy"] = evaluate_dataset(compressed, experiment.splits["validation"], batch_size,
                                                         collate)["accuracy"]
    return result


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


def _summarise_compression_aware(results: dict, settings: CompressionAware, hankel: dict,
                                 in_training: list[dict]) -> None:
    """Add the compression-aware arms to `results` (per rank, and a `compression_aware` entry)."""
    for entry in results["per_rank"]:
        rank = entry["rank"]
        mine = [row for row in hankel["rows"] if row["rank"] == rank]
        ratios = [row["keep_ratio"] for row in mine if row["keep_ratio"] is not None]
        during = [row for row in in_training if row["rank"] == rank]
        entry["hankel_original"] = _mean_std([row["original_test_accuracy"] for row in mine])
        entry["hankel_reduced"] = _mean_std([row["reduced_test_accuracy"] for row in mine])
        entry["hankel_keep_ratio"] = _mean_std(ratios) if ratios else None
        for method in settings.other_methods:
            others = [row for row in hankel["other_rows"] if row["rank"] == rank and row["method"] == method]
            other_ratios = [row["keep_ratio"] for row in others if row["keep_ratio"] is not None]
            entry.setdefault("hankel_other_methods", {})[method] = {
                "reduced": _mean_std([row["reduced_test_accuracy"] for row in others]),
                "keep_ratio": _mean_std(other_ratios) if other_ratios else None}
        # None at the ranks left out of `in_training_ranks`
        entry["reduced_during_training"] = _mean_std([row["test_accuracy"] for row in during]) if during else None
        entry["reduced_during_training_ssm_parameters"] = during[0]["ssm_parameters"] if during else None
    results["compression_aware"] = {
        "settings": asdict(settings),
        "hankel_selection": hankel["selection"],
        "hankel_original_models": hankel["originals"],
        "hankel_runs": [{key: value for key, value in row.items() if key != "hsv"} for row in hankel["rows"]],
        "hankel_other_method_runs": hankel["other_rows"],
        "in_training_runs": in_training,
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
    if "compression_aware" in results:
        lines += ["", compression_aware_table(results)]
    return "\n".join(lines)


def compression_aware_table(results: dict) -> str:
    """The compression-aware arms next to the unregularised originals, and how λ was chosen."""
    def cell(stats):
        return "—" if stats is None else f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    aware = results["compression_aware"]
    selection, settings = aware["hankel_selection"], aware["settings"]
    weight = selection["chosen_weight"]
    reuse = ", its gradient reused in between" if settings.get("hankel_reuse") else ""
    other_methods = settings.get("other_methods", ())  # absent in results of older runs
    lines = [
        f"Compression-aware arms (test accuracy in %, same seeds and recipe). Hankel penalty λ = {weight:g} "
        f"(every {settings['hankel_every']} steps{reuse}), its originals reduced by balanced truncation"
        + "".join(f" and by {method}" for method in other_methods) + " WITHOUT "
        f"retraining; reduction during training after {100 * settings['reduce_at']:g} % of a run as long as the BT "
        "arm's pre-training and main training together.",
        "",
        f"| rank | original (N = {results['settings']['d_state']}) | truncated, no retraining | BT + retraining "
        "| Hankel-regularised original | its truncation, no retraining | accuracy kept | reduced during training "
        + "".join(f"| by {method}, no retraining | kept " for method in other_methods) + "|",
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(other_methods),
    ]
    for entry in results["per_rank"]:
        others = entry.get("hankel_other_methods", {})
        lines.append(
            f"| {entry['rank']} | {cell(entry['original'])} | {cell(entry['truncated'])} | "
            f"{cell(entry['bt_retrained'])} | {cell(entry['hankel_original'])} | {cell(entry['hankel_reduced'])} | "
            f"{cell(entry['hankel_keep_ratio'])} | {cell(entry['reduced_during_training'])} |"
            + "".join(f" {cell(others[method]['reduced'])} | {cell(others[method]['keep_ratio'])} |"
                      for method in other_methods))
    grid = "; ".join(
        f"λ = {row['weight']:g}: original {100 * row['original_validation_accuracy']:.1f}, rank "
        f"{selection['rank']} {100 * row['reduced_validation_accuracy']:.1f}"
        + ("" if row["eligible"] else " (original more than the tolerance below)") for row in selection["grid"])
    lines += ["", f"λ chosen on the validation split of seed {selection['seed']} ({selection['epochs']} epochs): "
              f"the best validation accuracy after truncation to rank {selection['rank']}, among the λ whose "
              f"original is within {100 * selection['tolerance']:g} point(s) of the unregularised original "
              f"({100 * selection['unregularised_validation_accuracy']:.1f}). Validation accuracy in %: {grid}."]
    return "\n".join(lines)


def _write_outputs(output: str, results: dict, rows: list[dict], budget: Budget, task: str,
                   regularised_rows: list[dict] = ()) -> None:
    with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    table = results_table(results)
    with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
        regularised_peers = results.get("compression_aware", {}).get("peers")
        if "peers" in results or "shrink" in results or regularised_peers:
            handle.write("\n" + field_metric_tables(results.get("peers"), results.get("shrink", []),
                                                     regularised_peers))
    from .plots import (
        plot_accuracy_vs_parameters,
        plot_hsv_decay,
        plot_original_vs_compressed,
        plot_states_vs_accuracy,
    )

    if "peers" in results:
        plot_states_vs_accuracy(results["peers"]["curves"], os.path.join(output, "states_vs_accuracy.png"))
    if regularised_peers:
        plot_states_vs_accuracy(regularised_peers["curves"], os.path.join(output, "states_vs_accuracy_hankel.png"))

    plot_hsv_decay(rows, os.path.join(output, "hsv_decay.png"), regularised_rows)
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
    info = task_info(task)
    text = info.describe(budget.data) if info.describe is not None else f"Task {task} ({budget.data})"
    if budget.train_samples:
        text += f", first {budget.train_samples} training examples"
    return text + "."


def with_ranks(budget: Budget, ranks: list[int] | None) -> Budget:
    return budget if ranks is None else replace(copy.deepcopy(budget), ranks=list(ranks))


def with_seeds(budget: Budget, seeds: list[int] | None) -> Budget:
    """The budget's originals of these seeds only: a long run split between machines or sessions
    (each part's stages are the full run's, under the same keys: copy the `stages/` folders
    together and the full run skips them)."""
    if seeds is None:
        return budget
    known = [seed for seed, _ in budget.originals]
    unknown = [seed for seed in seeds if seed not in known]
    if unknown or not seeds:
        raise ValueError(f"seeds {list(seeds)}: the budget's originals have seeds {', '.join(map(str, known))}")
    return replace(copy.deepcopy(budget), originals=[entry for entry in budget.originals if entry[0] in seeds])
