"""Figures of an STN experiment: accuracy by variant, predicted against true angle, learned warps, and for a depth
sweep the measures against the depth k and the learning curves."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .angles import NO_COMPENSATION_STD  # noqa: E402
from .stability import COLLAPSE_ANGLE_DEG, flags  # noqa: E402


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
    note = " (features@k: the warp of layer k's map drawn on the image)" if any(
        variant.startswith("features@") for variant in experiment.models) else ""
    fig.suptitle("learned warps on test digits" + note, fontsize=9)
    return fig


_FAMILIES = (("shared", "C0", "o"), ("deep", "C3", "s"))


def depth_points(experiment) -> pd.DataFrame:
    """The runs of a depth sweep: ``family`` (shared, deep; ``input`` counts as k = 0 of both), ``k`` and the run's
    columns; empty when fewer than two depths of shared@k or deep@k were run."""
    from .models import variant_depth

    results = experiment.results
    rows = []
    for family, _, _ in _FAMILIES:
        for variant in dict.fromkeys(results["variant"]):
            if variant == "input" or str(variant).startswith(f"{family}@"):
                part = results[results["variant"] == variant].assign(family=family, k=variant_depth(variant))
                rows.append(part)
    points = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if points.empty or points.loc[points["k"] > 0, "k"].nunique() < 2:
        return pd.DataFrame()
    return points


def depth_figure(experiment) -> plt.Figure:
    """Angle std, test accuracy and the unstable share of seeds against the depth k the localization net reads.

    shared@k and deep@k as two lines of means over the seeds that did not diverge, each seed a point (hollow:
    the warp collapsed; x: diverged, at its value where it has one, else at the top of the angle panel); k = 0
    is the input STN; dashed: no compensation and no STN. Legends sit under the panels, off the points.
    """
    points = depth_points(experiment)
    results = experiment.results
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.8), constrained_layout=True)
    none = results[results["variant"] == "none"]
    for offset, (family, colour, marker) in zip((-0.08, 0.08), _FAMILIES):
        part = points[points["family"] == family]
        if part.empty:
            continue
        ks = sorted(part["k"].unique())
        for ax, column in zip(axes[:2], ("angle_std_deg", "test_accuracy")):
            finished = part[~flags(part, "diverged")]
            means = finished.groupby("k")[column].mean().reindex(ks)
            ax.plot(np.array(ks) + offset, means.values, "-", color=colour, label=f"{family}@k (mean)", lw=1.5)
            collapsed = flags(finished, "collapsed")
            ax.scatter(finished.loc[~collapsed, "k"] + offset, finished.loc[~collapsed, column], color=colour,
                       marker=marker, s=22, zorder=3)
            ax.scatter(finished.loc[collapsed, "k"] + offset, finished.loc[collapsed, column], facecolors="none",
                       edgecolors=colour, marker=marker, s=26, zorder=3)
        diverged = flags(part, "diverged").groupby(part["k"]).mean().reindex(ks)
        collapsed = flags(part, "collapsed").groupby(part["k"]).mean().reindex(ks)
        width = 0.35
        x = np.array(ks) + (offset * 2.2)
        axes[2].bar(x, diverged.values, width=width, color=colour, label=f"{family}: diverged")
        axes[2].bar(x, collapsed.values, width=width, bottom=diverged.values, color=colour, alpha=0.35,
                    label=f"{family}: collapsed")
        failed = part[flags(part, "diverged")]
        angle = failed["angle_std_deg"].where(failed["angle_std_deg"].notna(), NO_COMPENSATION_STD + 3).clip(upper=NO_COMPENSATION_STD + 5)
        axes[0].scatter(failed["k"] + offset, angle, marker="x", color=colour, s=30, zorder=3)
        axes[1].scatter(failed["k"] + offset, failed["test_accuracy"], marker="x", color=colour, s=30, zorder=3)
    for ax in axes[:2]:  # legend entries for the seed markers
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.3", s=26, label="seed, collapsed")
        ax.scatter([], [], marker="x", color="0.3", s=30, label="seed, diverged")
    axes[0].axhline(NO_COMPENSATION_STD, color="0.4", ls="--", lw=0.9, label=f"no compensation ({NO_COMPENSATION_STD:.1f})")
    axes[0].axhline(COLLAPSE_ANGLE_DEG, color="0.7", ls=":", lw=0.9, label=f"collapse line ({COLLAPSE_ANGLE_DEG:.1f})")
    axes[0].set_ylabel("angle_std_deg (0: one pose per class)")
    axes[0].set_ylim(0, NO_COMPENSATION_STD + 6)
    if len(none):
        axes[1].axhline(float(none["test_accuracy"].mean()), color="0.4", ls="--", lw=0.9,
                        label=f"no STN ({float(none['test_accuracy'].mean()):.3f})")
    axes[1].set_ylabel(f"test accuracy (mean of {experiment.settings['test_passes']} passes)")
    axes[2].set_ylabel("share of seeds")
    axes[2].set_ylim(0, 1.05)
    unstable = points.drop_duplicates(["variant", "seed"]) if len(points) else points
    n_unstable = int(flags(unstable, "diverged").sum() + flags(unstable, "collapsed").sum()) if len(unstable) else 0
    if n_unstable == 0:
        axes[2].text(0.5, 0.5, f"no seed diverged or collapsed\n(0 of {len(unstable)} runs)", transform=axes[2].transAxes,
                     ha="center", va="center", fontsize=9, color="0.3")
    ks_all = sorted(points["k"].unique()) if len(points) else []
    for ax in axes:
        ax.set_xticks(ks_all, ["input" if k == 0 else str(k) for k in ks_all])
        ax.set_xlabel("k: layers the localization net reads (input = 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    axes[0].set_title("how much rotation the warp leaves", fontsize=9)
    axes[1].set_title("accuracy", fontsize=9)
    axes[2].set_title("unstable seeds (diverged, collapsed)", fontsize=9)
    fig.suptitle("localization depth: shared@k (the classifier's own layers 1..k) against deep@k (a separate copy); "
                 "points: seeds, hollow: collapsed\n" + _title(experiment), fontsize=8)
    return fig


def curve_figure(experiment) -> plt.Figure:
    """Learning curves of the angle std on the probe set: one panel per family (input and shared@k, input and
    deep@k, others), one colour per variant, one thin line per seed and the mean over seeds thick."""
    curves = experiment.curves
    curves = curves[curves["probe_angle_std_deg"].notna() & (curves["variant"] != "none")]
    variants = list(dict.fromkeys(curves["variant"]))
    panels = {family: [v for v in variants if v == "input" or v.startswith(f"{family}@")] for family, _, _ in _FAMILIES}
    others = [v for v in variants if not any(v in vs for vs in panels.values())]
    panels = {k: v for k, v in panels.items() if any(name != "input" for name in v)}
    if others or not panels:  # the rest, against the input STN where there is one
        panels["other variants"] = (["input"] if "input" in variants else []) + others
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False, sharey=True,
                             constrained_layout=True)
    colours = plt.get_cmap("viridis")
    for ax, (family, names) in zip(axes[0], panels.items()):
        for i, variant in enumerate(names):
            colour = "k" if variant == "input" else colours(i / max(1, len(names) - 1))
            part = curves[curves["variant"] == variant]
            for _, seed_part in part.groupby("seed"):
                ax.plot(seed_part["step"], seed_part["probe_angle_std_deg"], color=colour, lw=0.6, alpha=0.45)
            mean = part.groupby("step")["probe_angle_std_deg"].mean()
            ax.plot(mean.index, mean.values, color=colour, lw=2, label=variant)
        ax.axhline(NO_COMPENSATION_STD, color="0.4", ls="--", lw=0.9)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    probe = min(1000, experiment.settings.get("test_images") or 1000)
    axes[0, 0].set_ylabel(f"angle_std_deg (probe: {probe} test digits)")
    ramp = experiment.settings.get("ramp") or 0
    if ramp > 0:
        for ax in axes[0]:
            ax.axvline(ramp * experiment.settings["iterations"], color="0.6", ls=":", lw=0.9)
            ax.text(ramp * experiment.settings["iterations"], 2, " full transform range from here", fontsize=7, color="0.4")
    axes[0, 0].set_ylim(0, NO_COMPENSATION_STD + 6)
    fig.suptitle("learning curves of the angle std (thin: seeds, thick: mean; dashed: no compensation)\n"
                 + _title(experiment), fontsize=8)
    return fig
