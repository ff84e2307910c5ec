"""Figures of the reproduction experiment (matplotlib, written to PNG files)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_hsv_decay(rows: list[dict], path: str, regularised_rows: list[dict] = ()) -> None:
    """Normalised Hankel singular values (mean over channels, σ_i / σ_1) per layer, one line per
    original model, log scale; Hankel-regularised originals (if any) dashed."""
    layers = len(rows[0]["hsv"])
    figure, axes = plt.subplots(1, layers, figsize=(4.5 * layers, 3.6), squeeze=False)
    seen = set()
    for style, group in (("-", rows), ("--", regularised_rows)):
        for row in group:
            key = (style, row["seed"], row["pretrain_epochs"])
            if key in seen:
                continue
            seen.add(key)
            label = f"seed {key[1]}, {key[2]} epochs ({100 * row['original_test_accuracy']:.1f}%)"
            if style == "--":
                label = f"Hankel λ={row['hankel_weight']:g}, " + label
            for layer, values in enumerate(row["hsv"]):
                axes[0, layer].semilogy(range(1, len(values) + 1), values, style, label=label)
    for layer in range(layers):
        axis = axes[0, layer]
        axis.set_title(f"layer {layer}")
        axis.set_xlabel("index i (real states)")
        axis.set_ylabel("σ_i / σ_1, mean over channels")
        axis.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle("Hankel singular value decay of the original models")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy_vs_parameters(results: dict, path: str) -> None:
    """Test accuracy (mean ± std) against SSM parameters for BT + retraining and the Skew-HiPPO
    baseline, with the originals as a reference point."""
    entries = results["per_rank"]
    params = [entry["ssm_parameters"] for entry in entries]
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for key, label, marker in (("bt_retrained", "balanced truncation + retraining", "o"),
                               ("skew_hippo_baseline", "Skew-HiPPO, same size", "s"),
                               ("truncated", "after truncation, no retraining", "x")):
        axis.errorbar(params, [100 * entry[key]["mean"] for entry in entries],
                      yerr=[100 * entry[key]["std"] for entry in entries], marker=marker, capsize=3, label=label)
    if "hankel_reduced" in entries[0]:  # the compression-aware arms
        for key, label, marker in (("hankel_reduced", "Hankel-regularised, truncated, no retraining", "D"),
                                   ("reduced_during_training", "reduced during training", "v")):
            measured = [entry for entry in entries if entry[key] is not None]  # in_training_ranks may skip some
            if measured:
                axis.errorbar([entry["ssm_parameters"] for entry in measured],
                              [100 * entry[key]["mean"] for entry in measured],
                              yerr=[100 * entry[key]["std"] for entry in measured], marker=marker, capsize=3,
                              label=label)
        for method in entries[0].get("hankel_other_methods", {}):
            stats = [entry["hankel_other_methods"][method]["reduced"] for entry in entries]
            axis.errorbar(params, [100 * stat["mean"] for stat in stats], yerr=[100 * stat["std"] for stat in stats],
                          marker="d", capsize=3, linestyle=":",
                          label=f"Hankel-regularised, {method.replace('_', ' ')}, no retraining")
    longer = [entry for entry in entries if entry.get("skew_hippo_equal_total_epochs")]
    if longer:
        axis.errorbar([entry["ssm_parameters"] for entry in longer],
                      [100 * entry["skew_hippo_equal_total_epochs"]["mean"] for entry in longer],
                      yerr=[100 * entry["skew_hippo_equal_total_epochs"]["std"] for entry in longer], marker="^",
                      capsize=3, linestyle="--", label="Skew-HiPPO, same size, equal total epochs")
    originals = results["original_models"]
    axis.errorbar([originals[0]["ssm_parameters"]],
                  [100 * sum(o["test_accuracy"] for o in originals) / len(originals)],
                  marker="*", markersize=12, linestyle="none", label=f"original (N = {results['settings']['d_state']})")
    axis.set_xscale("log")
    axis.set_xlabel("SSM parameters")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{results['task']}: accuracy vs size")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_original_vs_compressed(results: dict, path: str) -> None:
    """Accuracy of each original against that of its compressed-and-retrained models, one colour
    per rank, with the Pearson coefficient of all points."""
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for rank in sorted({run["rank"] for run in results["runs"]}):
        runs = [run for run in results["runs"] if run["rank"] == rank]
        axis.scatter([100 * run["original_test_accuracy"] for run in runs],
                     [100 * run["bt_retrained_test_accuracy"] for run in runs], label=f"rank {rank}")
    coefficient = results["pearson_original_vs_bt_retrained_all_ranks"]
    axis.set_title("original vs compressed accuracy, Pearson r = "
                   + ("undefined" if coefficient is None else f"{coefficient:.3f}"))
    axis.set_xlabel("original test accuracy (%)")
    axis.set_ylabel("BT + retraining test accuracy (%)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_reduction_comparison(results: dict, path: str) -> None:
    """Keep ratio (test accuracy without retraining / original accuracy, mean over originals)
    against the rank, one panel per setting, one line per reduction method."""
    settings = results["settings"]
    figure, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False, sharey=True)
    for column, setting in enumerate(settings):
        axis = axes[0, column]
        for variant in results["variants"]:
            points = sorted((row["rank"], row["keep_ratio"]) for row in results["summary"]
                            if row["variant"] == variant and row["setting"] == setting
                            and row["keep_ratio"] is not None)
            axis.plot([rank for rank, _ in points], [100 * ratio for _, ratio in points], marker="o", label=variant)
        axis.set_xscale("log", base=2)
        axis.set_title(setting)
        axis.set_xlabel("rank (complex modes per channel)")
        axis.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("accuracy kept without retraining (%)")
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_states_vs_accuracy(curves: list[dict], path: str) -> None:
    """Test accuracy without retraining (mean over originals) against the share of SSM states kept,
    one curve per method (solid without the refit, dashed with it); the originals' mean as a line."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {}
    originals = {row["original"]: row["original_test_accuracy"] for row in curves}
    for refit, axis in ((False, axes[0]), (True, axes[1])):
        groups = {}
        for row in curves:
            if row["refit"] == refit:
                groups.setdefault(row["variant"], {}).setdefault(row["kept_fraction"], []).append(row["test_accuracy"])
        for variant, points in groups.items():
            fractions = sorted(points)
            colour = colours.setdefault(variant, f"C{len(colours) % 10}")
            axis.plot([100 * fraction for fraction in fractions],
                      [100 * sum(points[f]) / len(points[f]) for f in fractions], marker="o", color=colour,
                      linestyle="--" if refit else "-", label=variant)
        axis.axhline(100 * sum(originals.values()) / len(originals), color="black", linewidth=0.8,
                     label="original")
        axis.set_xscale("log", base=2)
        axis.set_title("with the data-aware refit" if refit else "no refit")
        axis.set_xlabel("SSM states kept (% of the original's)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy without retraining (%), mean over originals")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
