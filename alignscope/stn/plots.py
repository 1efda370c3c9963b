"""Figures of an STN experiment: accuracy by variant, predicted against true angle, learned warps."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .angles import NO_COMPENSATION_STD  # noqa: E402


def _title(experiment) -> str:
    s = experiment.settings
    return (f"{s['data']}, task {s['task']}, {s['classifier']} classifier: {s['optimizer']} lr {s['lr']:g}, "
            f"{s['iterations']} iterations, {s['seeds']} seed(s)")


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
    ax.set_ylabel(f"test accuracy (mean of {experiment.settings['test_passes']} random passes)")
    ax.set_ylim(max(0.0, float(results["test_accuracy"].min()) - 0.1), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_title(experiment), fontsize=8)
    return fig


def angle_figure(experiment, max_points: int = 600) -> plt.Figure:
    """Per variant with an STN (seed 0, test pass 0): angle of the learned warp against the true rotation.

    Full compensation puts the points on lines of slope -1 (one per class pose); no compensation on phi = 0.
    """
    angles = experiment.angles[experiment.angles["seed"] == experiment.angles["seed"].min()]
    variants = list(dict.fromkeys(angles["variant"]))
    summary = experiment.summary().set_index("variant")
    cols = min(4, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.0 * cols, 6.0), 3.0 * rows + 0.6), squeeze=False,
                             constrained_layout=True,
                             sharex=True, sharey=True)
    line = np.array([-90.0, 90.0])
    for ax, variant in zip(axes.flat, variants):
        part = angles[angles["variant"] == variant].iloc[:max_points]
        ax.scatter(part["true_deg"], part["warp_deg"], c=part["label"], cmap="tab10", s=5, vmin=0, vmax=9)
        ax.plot(line, -line, "k--", lw=0.8, label="full compensation")
        ax.axhline(0, color="0.6", lw=0.8)
        row = summary.loc[variant]
        ax.set_title(f"{variant}: std {row['angle_std_deg_mean']:.1f} deg, slope {row['deming_slope_mean']:.2f}",
                     fontsize=8)
        ax.set_xlim(-95, 95)
        ax.set_ylim(-180, 180)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("true rotation (deg)")
    for ax in axes[:, 0]:
        ax.set_ylabel("angle of the learned warp (deg)")
    fig.suptitle(f"angle of the learned warp against the true rotation (seed 0, colour: class)\n"
                 f"dashed: full compensation; no compensation: std {NO_COMPENSATION_STD:.1f} deg, slope 0\n"
                 f"{_title(experiment)}", fontsize=7)
    return fig


def warp_grid_figure(experiment, n: int = 8) -> plt.Figure:
    """Rows: transformed test digits, then what each variant's learned warp does to them (seed 0)."""
    from .data import apply_task
    from .models import warped_inputs

    test = experiment.test
    images = apply_task(test.upright[:n], test.task, test.params[0, :n])
    rows = [("test input", images)] + [
        (variant, warped_inputs(model, images)) for variant, model in experiment.models.items() if variant != "none"
    ]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(batch[c, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("learned warps on test digits (features@k: the warp of layer k's map drawn on the image)", fontsize=9)
    return fig
