"""Plots of an alignment table: error by depth, transform x layer heatmap, sweeps.

All figures read only the tidy table (``alignment.csv``), so any report can
be redrawn later with ``alignscope plot``.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PANELS = (("aligned_error", "aligned (g$^{-1}$ applied)"), ("unaligned_error", "unaligned"), ("floor_error", "floor (image resampling)"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "sweep"


def _depth_axis(ax: plt.Axes, table: pd.DataFrame) -> None:
    if table["model"].nunique() == 1:
        ticks = table.drop_duplicates("depth").sort_values("depth")
        ax.set_xticks(ticks["depth"], ticks["layer"], rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xlabel("layer depth (1 = shallowest selected layer)")


def depth_figure(table: pd.DataFrame) -> plt.Figure:
    """Aligned, unaligned and floor error against depth; one colour per transform, 95% CI band on aligned."""
    shown = table[table["sweep"].fillna("") == ""] if (table["sweep"].fillna("") == "").any() else table
    transforms = list(dict.fromkeys(shown["transform"]))
    palette = dict(zip(transforms, sns.color_palette("tab10" if len(transforms) <= 10 else "husl", len(transforms))))
    models = list(dict.fromkeys(shown["model"]))
    styles = dict(zip(models, ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True, constrained_layout=True)
    for ax, (column, title) in zip(axes, PANELS):
        for (model, transform), group in shown.groupby(["model", "transform"], sort=False):
            group = group.sort_values("depth")
            label = transform if len(models) == 1 else f"{model} · {transform}"
            ax.plot(group["depth"], group[column], styles[model], marker="o", ms=3.5, color=palette[transform], label=label)
            low, high = f"{column}_ci_low", f"{column}_ci_high"
            if low in group and high in group:
                ax.fill_between(group["depth"], group[low], group[high], color=palette[transform], alpha=0.15, lw=0)
        ax.axhline(1.0, color="0.3", lw=1, ls="--")
        ax.text(ax.get_xlim()[0], 1.0, " chance", va="bottom", ha="left", fontsize=8, color="0.3")
        ax.set_title(title)
        _depth_axis(ax, shown)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("distance / chance distance")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(title="transform", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Feature-map alignment by depth — {', '.join(models)}", fontsize=11)
    return fig


FITTED_CURVES = (
    ("unaligned_error", "unaligned", "0.55", ":"),
    ("aligned_error", "aligned (g$^{-1}$)", "C0", "-"),
    ("optimal_error", "best warp in g's family", "C1", "--"),
    ("optimal_affine_error", "best affine warp", "C4", "-."),
    ("permuted_error", "g$^{-1}$ + channel permutation", "C2", "--"),
    ("channel_mapped_error", "g$^{-1}$ + linear channel map", "C3", "-"),
    ("floor_error", "floor (image resampling)", "0.2", ":"),
)


def fitted_figure(table: pd.DataFrame) -> plt.Figure | None:
    """One panel per transform: aligned, searched-warp and channel-mapped errors against depth, with controls."""
    present = [c for c in FITTED_CURVES if c[0] in table.columns and table[c[0]].notna().any()]
    if not any(c[0] in ("optimal_error", "optimal_affine_error", "permuted_error", "channel_mapped_error") for c in present):
        return None
    model = table["model"].iloc[0]
    one = table[(table["model"] == model) & (table["sweep"].fillna("") == "")]
    if one.empty:
        one = table[table["model"] == model]
    transforms = [t for t in dict.fromkeys(one["transform"]) if t != "identity"] or list(dict.fromkeys(one["transform"]))
    cols = min(3, len(transforms))
    rows = -(-len(transforms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), sharey=True, squeeze=False, constrained_layout=True)
    for ax, transform in zip(axes.flat, transforms):
        group = one[one["transform"] == transform].sort_values("depth")
        for column, label, color, style in present:
            ax.plot(group["depth"], group[column], style, marker="o", ms=3, color=color, label=label)
            low, high = f"{column}_ci_low", f"{column}_ci_high"
            if column != "unaligned_error" and low in group and high in group:
                ax.fill_between(group["depth"], group[low], group[high], color=color, alpha=0.12, lw=0)
        ax.axhline(1.0, color="0.3", lw=1, ls="--")
        ax.set_title(transform)
        _depth_axis(ax, group)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(transforms):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("distance / chance distance")
    axes[0, 0].set_ylim(bottom=0)
    axes[0, -1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    n_cal = int(one["n_calibration"].iloc[0]) if "n_calibration" in one else 0
    fig.suptitle(f"Can any warp, or a channel re-mixing, align the maps? — {model} "
                 f"(fitted on {n_cal} images, measured on {int(one['n_images'].max())} others)", fontsize=11)
    return fig


def heatmap_figure(table: pd.DataFrame) -> plt.Figure:
    """Transform x layer heatmap of aligned_error (rows in table order, columns by depth)."""
    model = table["model"].iloc[0]
    one = table[table["model"] == model]
    layers = one.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    transforms = list(dict.fromkeys(one["transform"]))
    grid = one.pivot_table(index="transform", columns="layer", values="aligned_error", aggfunc="mean").reindex(index=transforms, columns=layers)
    fig, ax = plt.subplots(figsize=(1.1 * len(layers) + 3, 0.42 * len(transforms) + 1.8), constrained_layout=True)
    top = max(1.0, float(grid.max().max()) if grid.notna().any().any() else 1.0)
    sns.heatmap(grid, annot=len(transforms) * len(layers) <= 400, fmt=".2f", cmap="rocket_r", vmin=0, vmax=top, ax=ax,
                cbar_kws={"label": "aligned_error (1 = chance)"}, annot_kws={"fontsize": 8})
    ax.set_title(f"aligned_error after g$^{{-1}}$ — {model}")
    ax.set_xlabel("layer")
    ax.set_ylabel("transform")
    return fig


def sweep_figures(table: pd.DataFrame) -> dict[str, plt.Figure]:
    """For each sweep: aligned and unaligned error against the swept magnitude, one line per layer."""
    figures = {}
    swept = table[table["sweep"].fillna("") != ""]
    for sweep, group in swept.groupby("sweep", sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
        layers = group.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
        palette = dict(zip(layers, sns.color_palette("viridis", len(layers))))
        for ax, column in zip(axes, ("aligned_error", "unaligned_error")):
            for layer in layers:
                rows = group[group["layer"] == layer].sort_values("magnitude")
                ax.plot(rows["magnitude"], rows[column], marker="o", ms=3, color=palette[layer], label=layer)
                if column == "aligned_error":
                    ax.fill_between(rows["magnitude"], rows["aligned_error_ci_low"], rows["aligned_error_ci_high"], color=palette[layer], alpha=0.15, lw=0)
            ax.axhline(1.0, color="0.3", lw=1, ls="--")
            ax.set_title(column.replace("_", " "))
            ax.set_xlabel(sweep.split(":")[0])
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("distance / chance distance")
        axes[0].set_ylim(bottom=0)
        axes[-1].legend(title="layer", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(f"sweep {sweep} — {group['model'].iloc[0]}", fontsize=11)
        figures[f"sweep_{_slug(sweep)}"] = fig
    return figures


def report_figures(table: pd.DataFrame) -> dict[str, plt.Figure]:
    """All figures of a report, keyed by file stem."""
    table = table.copy()
    if "sweep" not in table:
        table["sweep"] = ""
    figures = {"alignment_by_depth": depth_figure(table), "alignment_heatmap": heatmap_figure(table)}
    fitted = fitted_figure(table)
    if fitted is not None:
        figures["alignment_by_depth_fitted"] = fitted
    figures.update(sweep_figures(table))
    return figures


def channel_grid_figure(explanation, top: int = 4) -> plt.Figure:
    """For the worst and best ``top`` channels: a, b' (= g^-1 F(g x)), a - b' and the permutation's match."""
    table, example, meta = explanation.table, explanation.example, explanation.meta
    ranked = table.dropna(subset=["aligned_error"]).sort_values("aligned_error", ascending=False)
    top = max(1, min(top, len(ranked) // 2 or 1))
    chosen = [("worst", r) for _, r in ranked.head(top).iterrows()] + [("best", r) for _, r in ranked.tail(top)[::-1].iterrows()]
    a, b, mask = example["reference"], example["aligned"], example["mask"]
    titles = ("a = F(x)", "b' = g$^{-1}$F(g x)", "a - b'", "b' of matched channel")
    fig, axes = plt.subplots(len(chosen), 4, figsize=(9.5, 2.25 * len(chosen)), squeeze=False, constrained_layout=True)
    for row, (kind, record) in enumerate(chosen):
        c, match = int(record["channel"]), int(record["match"])
        panels = (a[c] * mask, b[c] * mask, (a[c] - b[c]) * mask, b[match] * mask)
        limit = float(max(p.abs().max() for p in panels)) or 1.0
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel.float().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
        axes[row, 0].set_ylabel(f"{kind} c={c}\nerr {record['aligned_error']:.2f}", fontsize=8)
        axes[row, 3].set_xlabel(f"match {match}: err {record['matched_error']:.2f}", fontsize=8)
    fig.suptitle(f"{meta['model']} {meta['layer']} under {meta['transform']} — {Path(str(meta['example_image'])).name}", fontsize=10)
    return fig


def save_figures(figures: dict[str, plt.Figure], folder: Path, dpi: int = 130) -> list[Path]:
    """Save each figure as ``folder/<stem>.png`` (atomically: an interrupt never leaves half a PNG) and close it."""
    from .files import atomic_path

    paths = []
    for stem, fig in figures.items():
        path = Path(folder) / f"{stem}.png"
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi, format="png")
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
