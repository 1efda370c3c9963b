"""Figures of an STN experiment: accuracy by variant, and the learned warps on test digits."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_figure(experiment) -> plt.Figure:
    """Test accuracy per variant: mean +- std across seeds, each seed as a dot."""
    summary = experiment.summary()
    results = experiment.results
    fig, ax = plt.subplots(figsize=(1.0 * len(summary) + 2.5, 3.8), constrained_layout=True)
    xs = range(len(summary))
    ax.bar(xs, summary["test_accuracy_mean"], yerr=summary["test_accuracy_std"].fillna(0), color="C0", alpha=0.6,
           capsize=3)
    for x, variant in zip(xs, summary["variant"]):
        values = results.loc[results["variant"] == variant, "test_accuracy"]
        ax.plot([x] * len(values), values, "k.", ms=5)
    ax.set_xticks(list(xs), summary["variant"], rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    low = max(0.0, float(results["test_accuracy"].min()) - 0.1)
    ax.set_ylim(low, 1.0)
    ax.grid(axis="y", alpha=0.3)
    s = experiment.settings
    ax.set_title(f"task {s['task']}: {s['epochs']} epochs, {s['seeds']} seed(s), warp {s['warp']}", fontsize=10)
    return fig


def warp_grid_figure(experiment, n: int = 8) -> plt.Figure:
    """Rows: the test digits, then what each STN variant's learned warp does to them (seed 0)."""
    from .experiment import warped_inputs

    images = experiment.splits.test_images[:n]
    rows = [("test input", images)] + [
        (variant, warped_inputs(model, images)) for variant, model in experiment.models.items() if variant != "none"
    ]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows)), squeeze=False, constrained_layout=True)
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(batch[c, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("learned warps on test digits (features@k: the same warp drawn on the image)", fontsize=9)
    return fig
