"""Figures of the model's prediction: the output rows (does it change under g?) and the placement rows
(would an exact STN at a layer keep it?). Conventions as in :mod:`alignscope.report.plots`.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .plots import label_outer, panel_grid, random_weights_note

AGREEMENT_LABEL = "top-1 agreement with f(x)"
KL_LABEL = "KL(p(x) || p), nats"


def prediction_figure(table: pd.DataFrame) -> plt.Figure:
    """The output rows: top-1 agreement (95% Wilson interval) and mean KL (95% interval) per transform.

    Chance (two unrelated images) and, where g is interpolated, the floor
    (the image round trip alone) are drawn as markers on the same rows.
    Sweeps appear as their own transforms; the identity is left out. Several
    models: one colour per model.
    """
    rows = table[table["transform"] != "identity"]
    rows = rows if len(rows) else table
    transforms = list(dict.fromkeys(rows["transform"]))
    models = list(dict.fromkeys(rows["model"]))
    colors = dict(zip(models, sns.color_palette("tab10" if len(models) <= 10 else "husl", len(models))))
    height = 0.32 * len(transforms) * max(1, len(models)) ** 0.5 + 1.9
    fig, axes = plt.subplots(1, 2, figsize=(11.5, height), sharey=True, constrained_layout=True)
    offsets = np.linspace(-0.2, 0.2, len(models)) if len(models) > 1 else [0.0]
    position = {spec: i for i, spec in enumerate(transforms)}
    for offset, model in zip(offsets, models):
        group = rows[rows["model"] == model]
        y = group["transform"].map(position).to_numpy(dtype=float) + offset
        for ax, column in zip(axes, ("prediction_agreement", "prediction_kl")):
            value = group[column].to_numpy(dtype=float)
            low = value - group[f"{column}_ci_low"].to_numpy(dtype=float)
            high = group[f"{column}_ci_high"].to_numpy(dtype=float) - value
            ax.errorbar(value, y, xerr=[low, high], fmt="o", ms=4.5, capsize=3, color=colors[model],
                        label=model if len(models) > 1 else "x vs g x, 95% CI")
            ax.scatter(group[f"{column}_chance"], y, marker="x", s=30, color="0.35", zorder=4,
                       label="x vs an unrelated image (chance)" if offset == offsets[0] else None)
            interpolated = ~group["exact"].astype(str).str.lower().eq("true").to_numpy()
            if interpolated.any():
                ax.scatter(group[f"{column}_floor"].to_numpy(dtype=float)[interpolated], y[interpolated], marker="|",
                           s=90, color="0.2", zorder=4, label="x vs g$^{-1}$(g x) (floor)" if offset == offsets[0] else None)
    axes[0].set_xlim(-0.03, 1.03)
    axes[0].set_xlabel("top-1 agreement (share of images whose class does not change)")
    axes[1].set_xlabel("mean KL(p(x) || p(g x)), nats")
    axes[1].set_xlim(left=0)
    axes[0].set_yticks(range(len(transforms)))
    axes[0].set_yticklabels(transforms, fontsize=8.5)
    axes[0].set_ylim(len(transforms) - 0.5, -0.5)
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    images = int(rows["n_images"].max()) if len(rows) else 0
    fig.suptitle(f"Does the prediction change? — {', '.join(models)} ({images} images){random_weights_note(table)}",
                 fontsize=11)
    return fig


def placement_figures(placements: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, plt.Figure]:
    """``placement`` (agreement) and ``placement_kl``: one panel per transform, the place of the STN on the x axis
    (``input`` at 0, then the layers by depth), one line per alignment with its 95% interval as a band; the
    output row's no-correction value f(g x) dashed and chance dotted. The identity is left out."""
    rows = placements[placements["transform"] != "identity"]
    rows = rows if len(rows) else placements
    outputs = predictions.set_index("transform") if len(predictions) else pd.DataFrame()
    transforms = list(dict.fromkeys(rows["transform"]))
    kinds = list(dict.fromkeys(rows["placed_by"].fillna("inverse"))) if "placed_by" in rows else ["inverse"]
    colors = dict(zip(kinds, sns.color_palette("tab10", max(len(kinds), 1))))
    figures = {}
    for stem, column, reference, label in (("placement", "placed_agreement", "prediction_agreement", AGREEMENT_LABEL),
                                           ("placement_kl", "placed_kl", "prediction_kl", KL_LABEL)):
        fig, axes = panel_grid(len(transforms))
        for ax, transform in zip(axes.flat, transforms):
            group = rows[rows["transform"] == transform]
            for kind in kinds:
                line = group[group.get("placed_by", pd.Series("inverse", index=group.index)).fillna("inverse") == kind]
                line = line.sort_values("depth")
                if line.empty:
                    continue
                if kind != "inverse":  # a fitted STN starts from the same input placement
                    line = pd.concat([group[group["depth"] == 0], line])
                x = line["depth"].to_numpy(dtype=float)
                y = line[column].to_numpy(dtype=float)
                ax.plot(x, y, "o-", ms=4, lw=1.6, color=colors[kind], label=f"exact STN there ({kind})")
                ax.fill_between(x, line[f"{column}_ci_low"].to_numpy(dtype=float),
                                line[f"{column}_ci_high"].to_numpy(dtype=float), color=colors[kind], alpha=0.15, lw=0)
            if transform in outputs.index:
                ax.axhline(float(outputs.loc[transform, reference]), color="0.25", ls="--", lw=1.1,
                           label="no STN: f(g x)")
                ax.axhline(float(outputs.loc[transform, f"{reference}_chance"]), color="0.55", ls=":", lw=1.1,
                           label="an unrelated image (chance)")
            ax.set_title(transform, fontsize=9.5)
            ax.grid(alpha=0.3)
        if column == "placed_agreement":
            axes.flat[0].set_ylim(-0.03, 1.03)
        else:
            axes.flat[0].set_ylim(bottom=0)
        label_outer(axes, rows, len(transforms), label)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
        models = ", ".join(dict.fromkeys(rows["model"].astype(str)))
        images = int(rows["n_images"].max()) if len(rows) else 0
        what = "top-1 agreement with f(x)" if column == "placed_agreement" else "KL(p(x) || p), nats"
        fig.suptitle(f"Where could an STN go? An exact g$^{{-1}}$ at each place: {what} — {models} "
                     f"({images} images){random_weights_note(rows)}", fontsize=10.5)
        figures[stem] = fig
    return figures
