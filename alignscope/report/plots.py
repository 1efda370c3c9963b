"""Plots of an alignment table: error by depth, transform x layer heatmap, sweeps (all of a report's figures
together: :func:`alignscope.report.figures.report_figures`).

All figures read only the tidy table (``alignment.csv``), so any report can
be redrawn later with ``alignscope plot``. Conventions shared by every figure:

- the x axis of a depth plot has one tick per selected layer (``depth`` is an
  integer position, so 1.5 does not exist), labelled with the layer's name;
- the identity transform is left out of figures (it stays in the CSV): its
  errors are 0 by construction (so is a sweep value such as ``rotate0``);
- sweep rows appear only in their sweep plot, unless a run has nothing else;
- the output rows (the model's prediction, :mod:`alignscope.measure.prediction`) are
  not distances to chance: they stay out of the depth, heatmap and sweep
  figures and get their own figures (:mod:`alignscope.report.prediction_plots`);
- a run with random weights says so in every figure title.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .output_rows import layer_rows  # noqa: E402
from .verdicts import floor_above_aligned  # noqa: E402

ERROR_LABEL = "distance / chance distance"
SWEEP_UNITS = {
    "rotate": "rotation angle (degrees, counter-clockwise)",
    "scale": "scale factor (> 1 enlarges)",
    "shear": "x-shear angle (degrees)",
    "translate": "horizontal shift (input pixels)",
}
FLOOR_NOTE = ("circled: the floor is above the aligned error; the image round trip g$^{-1}$(g x) blacks out content "
              "that these layers' receptive fields reach, so there the floor is a reference, not a lower bound")
DEPTH_LABEL = "layer (shallow → deep)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "sweep"


def _is_pretrained(table: pd.DataFrame) -> pd.Series:
    """Per row: pretrained weights (a table without the column counts as pretrained; CSVs may hold strings)."""
    if "pretrained" not in table:
        return pd.Series(True, index=table.index)
    return table["pretrained"].astype(str).str.lower().eq("true")


def random_weights_note(table: pd.DataFrame) -> str:
    """A second title line ``RANDOM WEIGHTS ...`` when any model in ``table`` is not pretrained, else ``""``."""
    pretrained = _is_pretrained(table)
    if pretrained.all():
        return ""
    random = table.loc[~pretrained, "model"].unique()
    if table["model"].nunique() == 1:
        return "\nRANDOM WEIGHTS (not pretrained)"
    return f"\nRANDOM WEIGHTS (not pretrained): {', '.join(map(str, random))}"


def depth_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows a depth plot shows, identity left out.

    Per model its non-sweep rows (its sweep rows if it has no others), plus
    the sweep rows of a transform another model shows, so runs compared with
    ``compare`` meet wherever they measured the same spec. Output rows are left out.
    """
    table = layer_rows(table).reset_index(drop=True)
    sweep = table["sweep"].fillna("") != ""
    parts = []
    for _, group in table.groupby("model", sort=False):
        plain = group[~sweep.loc[group.index]]
        parts.append(plain if len(plain) else group)
    shown = pd.concat(parts) if parts else table
    specs = set(shown["transform"])
    for model, group in table[sweep].groupby("model", sort=False):
        own = set(shown.loc[shown["model"] == model, "transform"])
        extra = group[group["transform"].isin(specs - own)].drop_duplicates(["transform", "layer"])
        shown = pd.concat([shown, extra])
    order = {spec: i for i, spec in enumerate(dict.fromkeys(table["transform"]))}
    shown = shown.sort_values("transform", key=lambda s: s.map(order), kind="stable")
    # the identity, by name or in effect (a sweep's rotate0: every error exactly 0 at every layer)
    zero = shown[["aligned_error", "unaligned_error"]].fillna(1).eq(0).all(axis=1).groupby(shown["transform"]).transform("all")
    non_identity = shown[(shown["transform"] != "identity") & ~zero]
    return non_identity if len(non_identity) else shown


def layer_axis(ax: plt.Axes, table: pd.DataFrame, labels: bool = True) -> None:
    """One tick per integer depth, labelled with the layer name(s) found at that depth."""
    # stable sort: at a shared depth, names follow the order of the models in the table
    names = table.drop_duplicates(["depth", "layer"]).sort_values("depth", kind="stable").groupby("depth", sort=True)["layer"]
    depths = [int(d) for d in names.groups]
    ax.set_xticks(depths)
    texts = [" / ".join(names.get_group(d).astype(str)) for d in depths]
    # upright labels while they fit side by side (about 11 characters per tick in a small panel)
    upright = max(map(len, texts)) * len(texts) <= 48
    ax.set_xticklabels(texts if labels else [], rotation=0 if upright else 45, ha="center" if upright else "right",
                       fontsize=7.5)
    ax.set_xlim(min(depths) - 0.35, max(depths) + 0.35)


def panel_grid(count: int, width: float = 3.3, height: float = 2.7, max_cols: int = 4):
    """A figure of ``count`` panels, at most ``max_cols`` a row, shared axes; the unused ones hidden."""
    cols = min(max_cols, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 7.0) + 2.6, height * rows + 1.4), sharex=True, sharey=True,
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes


def label_outer(axes: np.ndarray, table: pd.DataFrame, count: int, ylabel: str = ERROR_LABEL) -> None:
    """Layer names under the lowest visible panel of each column, ``ylabel`` on the first column."""
    rows, cols = axes.shape
    for index, ax in enumerate(axes.flat[:count]):
        row, col = divmod(index, cols)
        lowest = row == rows - 1 or (row + 1) * cols + col >= count
        layer_axis(ax, table, labels=lowest)
        ax.tick_params(labelbottom=lowest)
        if col == 0:
            ax.set_ylabel(ylabel, fontsize=8)


def depth_figure(table: pd.DataFrame) -> plt.Figure:
    """One small panel per transform, shared axes: aligned error with its 95% CI band against depth,
    unaligned and floor as thin reference lines, chance at 1. Several models: one colour per model."""
    shown = depth_rows(table)
    transforms = list(dict.fromkeys(shown["transform"]))
    models = list(dict.fromkeys(shown["model"]))
    colors = dict(zip(models, sns.color_palette("tab10" if len(models) <= 10 else "husl", len(models))))
    fig, axes = panel_grid(len(transforms))
    top = 1.05
    circled = False
    for ax, transform in zip(axes.flat, transforms):
        for model in models:
            group = shown[(shown["transform"] == transform) & (shown["model"] == model)].sort_values("depth")
            if group.empty:
                continue
            color = colors[model]
            ax.plot(group["depth"], group["aligned_error"], "-o", ms=3.5, lw=1.8, color=color)
            if {"aligned_error_ci_low", "aligned_error_ci_high"} <= set(group.columns):
                ax.fill_between(group["depth"], group["aligned_error_ci_low"], group["aligned_error_ci_high"],
                                color=color, alpha=0.2, lw=0)
            ax.plot(group["depth"], group["unaligned_error"], "--", lw=0.9, color=color, alpha=0.8)
            ax.plot(group["depth"], group["floor_error"], ":", lw=1.1, color=color, alpha=0.9)
            above = floor_above_aligned(group)
            if len(above):
                circled = True
                ax.scatter(above["depth"], above["floor_error"], s=70, facecolors="none", edgecolors="crimson", lw=1.2, zorder=5)
            top = max(top, float(np.nanmax(group[["aligned_error", "unaligned_error", "floor_error"]].to_numpy(dtype=float))) + 0.05)
        ax.axhline(1.0, color="0.35", lw=0.8, ls="-.")
        ax.set_title(transform, fontsize=9.5)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(0, top)
    label_outer(axes, shown, len(transforms))
    style = [Line2D([], [], color="0.2", lw=1.8, marker="o", ms=3.5, label="aligned (g$^{-1}$ applied), 95% CI band"),
             Line2D([], [], color="0.2", lw=0.9, ls="--", label="unaligned (no warp)"),
             Line2D([], [], color="0.2", lw=1.1, ls=":", label="floor (image resampling)"),
             Line2D([], [], color="0.35", lw=0.8, ls="-.", label="chance (another image)")]
    if circled:
        style.append(Line2D([], [], ls="", marker="o", ms=8, mfc="none", mec="crimson", label="floor above aligned"))
    if len(models) > 1:
        random = set(shown.loc[~_is_pretrained(shown), "model"])
        labels = {m: f"{m} (random weights)" if m in random else m for m in models}
        fig.add_artist(fig.legend(handles=[Line2D([], [], color=colors[m], lw=2, label=labels[m]) for m in models],
                                  loc="outside right upper", fontsize=8, title="model"))
    fig.legend(handles=style, loc="outside right center" if len(models) > 1 else "outside right upper", fontsize=8, title="lines")
    images = int(shown["n_images"].max()) if len(shown) else 0
    fig.suptitle(f"Feature-map alignment by depth — {', '.join(models)} ({images} images){random_weights_note(table)}",
                 fontsize=11)
    fig.supxlabel(DEPTH_LABEL + ("\n" + FLOOR_NOTE if circled else ""), fontsize=9 if not circled else 8)
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
    one = depth_rows(table[table["model"] == model])
    transforms = list(dict.fromkeys(one["transform"]))
    fig, axes = panel_grid(len(transforms), width=4.4, height=3.3, max_cols=3)
    for ax, transform in zip(axes.flat, transforms):
        group = one[one["transform"] == transform].sort_values("depth")
        for column, label, color, style in present:
            ax.plot(group["depth"], group[column], style, marker="o", ms=3, color=color, label=label)
            low, high = f"{column}_ci_low", f"{column}_ci_high"
            if column != "unaligned_error" and low in group and high in group:
                ax.fill_between(group["depth"], group[low], group[high], color=color, alpha=0.12, lw=0)
        ax.axhline(1.0, color="0.3", lw=1, ls="-.")
        ax.set_title(transform, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(bottom=0)
    label_outer(axes, one, len(transforms))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.supxlabel(DEPTH_LABEL, fontsize=9)
    n_cal = int(one["n_calibration"].iloc[0]) if "n_calibration" in one else 0
    fig.suptitle(f"Can any warp, or a channel re-mixing, align the maps? — {model}\n"
                 f"(fitted on {n_cal} images, measured on {int(one['n_images'].max())} others){random_weights_note(table)}",
                 fontsize=11)
    return fig


def heatmap_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The first model's rows a heatmap shows: non-sweep transforms (sweeps if nothing else), no identity."""
    return depth_rows(table[table["model"] == table["model"].iloc[0]])


def heatmap_figure(table: pd.DataFrame) -> plt.Figure:
    """Transform x layer heatmap of aligned_error (rows in table order, columns by depth)."""
    one = heatmap_rows(table)
    model = one["model"].iloc[0]
    layers = one.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
    transforms = list(dict.fromkeys(one["transform"]))
    grid = one.pivot_table(index="transform", columns="layer", values="aligned_error", aggfunc="mean").reindex(index=transforms, columns=layers)
    fig, ax = plt.subplots(figsize=(1.1 * len(layers) + 3.4, 0.42 * len(transforms) + 1.9), constrained_layout=True)
    top = max(1.0, float(grid.max().max()) if grid.notna().any().any() else 1.0)
    sns.heatmap(grid, annot=len(transforms) * len(layers) <= 400, fmt=".2f", cmap="rocket_r", vmin=0, vmax=top, ax=ax,
                cbar_kws={"label": "aligned_error (1 = chance)"}, annot_kws={"fontsize": 8})
    ax.set_title(f"aligned_error after g$^{{-1}}$ — {model}{random_weights_note(table)}", fontsize=10)
    ax.set_xlabel("layer (shallow → deep)")
    ax.set_ylabel("transform")
    return fig


def _sweep_ticks(ax: plt.Axes, values: np.ndarray) -> None:
    """A tick at every sampled value; with many, every k-th one is labelled so labels do not collide."""
    step = max(1, -(-len(values) // 13))
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" if i % step == 0 else "" for i, v in enumerate(values)], fontsize=8)


def sweep_figures(table: pd.DataFrame) -> dict[str, plt.Figure]:
    """For each sweep: aligned, unaligned and floor error against the swept value, one line per layer."""
    figures = {}
    swept = table[table["sweep"].fillna("") != ""]
    models = swept["model"].nunique()
    for (model, sweep), group in swept.groupby(["model", "sweep"], sort=False):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.3), sharey=True, constrained_layout=True)
        layers = group.drop_duplicates("layer").sort_values("depth")["layer"].tolist()
        palette = dict(zip(layers, sns.color_palette("viridis", len(layers))))
        values = np.sort(group["magnitude"].dropna().unique())
        family = sweep.split(":")[0]
        for ax, column in zip(axes, ("aligned_error", "unaligned_error", "floor_error")):
            for layer in layers:
                rows = group[group["layer"] == layer].sort_values("magnitude")
                ax.plot(rows["magnitude"], rows[column], marker="o", ms=3, color=palette[layer], label=layer)
                low, high = f"{column}_ci_low", f"{column}_ci_high"
                if low in rows and high in rows:
                    ax.fill_between(rows["magnitude"], rows[low], rows[high], color=palette[layer], alpha=0.15, lw=0)
            ax.axhline(1.0, color="0.35", lw=0.8, ls="-.")
            ax.set_title({"aligned_error": "aligned (g$^{-1}$ applied)", "unaligned_error": "unaligned (no warp)",
                          "floor_error": "floor (image resampling)"}[column], fontsize=10)
            ax.set_xlabel(SWEEP_UNITS.get(family, family))
            _sweep_ticks(ax, values)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(ERROR_LABEL)
        axes[0].set_ylim(bottom=0)
        axes[-1].legend(title="layer", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        sub = table[table["model"] == model]
        fig.suptitle(f"sweep {sweep} — {model} ({int(group['n_images'].max())} images; bands: 95% CI){random_weights_note(sub)}",
                     fontsize=11)
        figures[f"sweep_{_slug(sweep)}" if models == 1 else f"sweep_{_slug(model)}_{_slug(sweep)}"] = fig
    return figures


def channel_grid_figure(explanation, top: int = 4) -> plt.Figure:
    """For the worst and best ``top`` channels: a, b' (= g^-1 F(g x)), a - b' and the permutation's match.

    Each row shares one symmetric colour scale (feature units of the layer), shown by the colour bar at its end.
    """
    table, example, meta = explanation.table, explanation.example, explanation.meta
    ranked = table.dropna(subset=["aligned_error"]).sort_values("aligned_error", ascending=False)
    top = max(1, min(top, len(ranked) // 2 or 1))
    chosen = [("worst", r) for _, r in ranked.head(top).iterrows()] + [("best", r) for _, r in ranked.tail(top)[::-1].iterrows()]
    a, b, mask = example["reference"], example["aligned"], example["mask"]
    titles = ("a = F(x)", "b' = g$^{-1}$F(g x)", "a - b'", "b' of matched channel")
    fig, axes = plt.subplots(len(chosen), 4, figsize=(10.5, 2.25 * len(chosen) + 0.4), squeeze=False, constrained_layout=True)
    for row, (kind, record) in enumerate(chosen):
        c, match = int(record["channel"]), int(record["match"])
        panels = (a[c] * mask, b[c] * mask, (a[c] - b[c]) * mask, b[match] * mask)
        limit = float(max(p.abs().max() for p in panels)) or 1.0
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            image = ax.imshow(panel.float().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.9, pad=0.01, aspect=12).ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel(f"{kind} c={c}\nerr {record['aligned_error']:.2f}", fontsize=8)
        axes[row, 3].set_xlabel(f"match {match}: err {record['matched_error']:.2f}", fontsize=8)
    weights = "" if meta.get("pretrained", True) else "\nRANDOM WEIGHTS (not pretrained)"
    why = meta.get("example_reason", "")
    fig.suptitle(f"{meta['model']} {meta['layer']} under {meta['transform']} — image {Path(str(meta['example_image'])).name}"
                 f"{f' ({why})' if why else ''}{weights}", fontsize=10)
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
