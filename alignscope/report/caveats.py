"""Caveats on a finished alignment table that a reader must hear about, logged as one line each.

:func:`nonfinite_layers` (NaN/inf maps; an error when no number is left),
:func:`warn_left_out` (images left out for a zero chance distance) and
:func:`warn_chance_collapse`: every error column is divided by the chance
distance (the distance between the maps of two different images). When a
layer's maps barely depend on the input (random weights of some
architectures, dead units), that distance is a vanishing fraction of the
maps' own size and the ratios blow up: arithmetically right, meaningless to
read. The warning names the layers.
"""
from __future__ import annotations

import logging

import pandas as pd

from ..errors import AlignscopeError, ImageError

log = logging.getLogger("alignscope")

CHANCE_COLLAPSE_RATIO = 1e-3  # chance distance below this fraction of the reference map's norm


def collapsed_layers(table: pd.DataFrame, ratio: float = CHANCE_COLLAPSE_RATIO) -> list[tuple[str, float]]:
    """(layer, smallest chance_distance / reference_norm) for layers whose ratio falls below ``ratio``.

    Needs the ``chance_distance`` and ``reference_norm`` columns (per-image
    means, same units: the layer's activations); a table without them gives [].
    """
    if not {"chance_distance", "reference_norm", "layer"} <= set(table.columns):
        return []
    scale = table["reference_norm"].where(table["reference_norm"] > 0)
    relative = (table["chance_distance"] / scale).groupby(table["layer"], sort=False).min()
    return [(str(layer), float(value)) for layer, value in relative.items() if value < ratio]


def chance_collapse_caveat(table: pd.DataFrame, ratio: float = CHANCE_COLLAPSE_RATIO) -> str:
    """The sentence naming the layers whose chance distance is negligible ("" when none)."""
    collapsed = collapsed_layers(table, ratio)
    if not collapsed:
        return ""
    shown = ", ".join(f"{layer} ({value:.1e})" for layer, value in collapsed[:5])
    more = f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else ""
    why = ("an exact 0 means the maps of different images are identical: duplicate images, or a layer that ignores "
           "its input" if any(value == 0 for _, value in collapsed) else "random weights? use pretrained ones")
    return (f"chance distance collapsed at {len(collapsed)} layer(s): {shown}{more} (chance / map norm); these maps "
            f"barely depend on the image, so every *_error there divides by almost nothing and is not meaningful ({why})")


def warn_chance_collapse(table: pd.DataFrame, ratio: float = CHANCE_COLLAPSE_RATIO) -> list[tuple[str, float]]:
    """Log :func:`chance_collapse_caveat` as one warning; returns the collapsed layers."""
    sentence = chance_collapse_caveat(table, ratio)
    if sentence:
        log.warning("%s", sentence)
    return collapsed_layers(table, ratio)


def nonfinite_caveat(table: pd.DataFrame, n_images: int) -> str:
    """The sentence naming the layers with NaN/inf maps and for how many images ("" when none)."""
    nonfinite = table["n_nonfinite"] if "n_nonfinite" in table else pd.Series(0, index=table.index)
    bad = table[nonfinite > 0]
    if bad.empty:
        return ""
    per_layer = bad.groupby("layer", sort=False)["n_nonfinite"].max()
    details = ", ".join(f"{layer} ({int(count)} of {n_images} images)" for layer, count in per_layer.items())
    return (f"non-finite feature maps (NaN or inf) at {len(per_layer)} layer(s): {details}; those images are left out "
            "of these rows (column n_nonfinite). The layer overflows or its weights/inputs are broken.")


def nonfinite_layers(table: pd.DataFrame, n_images: int) -> list[str]:
    """Log :func:`nonfinite_caveat` and return the layers with NaN/inf maps; fail when no number is left."""
    bad = table[table["n_nonfinite"] > 0]
    if bad.empty:
        return []
    if len(bad) == len(table) and (bad["n_nonfinite"] >= n_images).all():
        raise AlignscopeError(
            f"every feature map was NaN or inf (all {n_images} images at all {table['layer'].nunique()} layers): "
            "the model's computation overflows or its inputs are not finite; nothing to report")
    log.warning("%s", nonfinite_caveat(table, n_images))
    return list(bad.groupby("layer", sort=False)["n_nonfinite"].max().index)


def refuse_all_duplicates(table: pd.DataFrame, n_images: int) -> None:
    """Fail when no layer row has a number because every image was left out as equal (or nearly) to its chance
    partner at every layer: the images are copies of one another, or the maps ignore the image; a report of NaN
    rows only would read as a result."""
    counts = [table[c] for c in ("n_identical", "n_near_duplicate") if c in table]
    if table.empty or not counts or table["aligned_error"].notna().any() or (table["n_images"] > 0).any():
        return
    if (sum(counts) >= n_images).all():
        raise ImageError(f"no layer could be measured: at every layer each of the {n_images} images' maps equal (or "
                         "nearly) its chance partner's, so no chance distance is left to divide by (copies of one image, "
                         "or a model whose maps do not depend on the image); pass distinct images")


def left_out_caveat(table: pd.DataFrame, n_images: int) -> str:
    """The sentence saying how many rows left images out, and why ("" when none)."""
    nonfinite = table["n_nonfinite"] if "n_nonfinite" in table else pd.Series(0, index=table.index)
    short = table[table["n_images"] + nonfinite < n_images]
    if not len(short):
        return ""
    worst = short.loc[short["n_images"].idxmin()]
    causes = []
    for column, cause in (("n_identical", "maps equal to their chance partner's (duplicate images, or a layer that "
                                          "ignores its input)"),
                          ("n_near_duplicate", "a chance distance below the floor (near-duplicate images)")):
        if column in short and short[column].sum() > 0:
            causes.append(f"{cause} at {int((short[column] > 0).sum())} row(s)")
    support = short["why_missing"].astype(str).str.contains("valid cells") if "why_missing" in short else None
    if support is not None and support.any():
        causes.append(f"too few valid cells at {int(support.sum())} row(s)")
    why = "; ".join(causes) if causes else "a zero chance distance (an image identical to its partner, or no valid cells)"
    return (f"{len(short)} of {len(table)} (layer, transform) rows left images out: {why}; fewest: "
            f"{int(worst['n_images'])} of {n_images} images at {worst['layer']} / {worst['transform']}. Remove duplicate "
            "images or use a milder transform.")


def warn_left_out(table: pd.DataFrame, n_images: int) -> None:
    """Log :func:`left_out_caveat` as one warning."""
    sentence = left_out_caveat(table, n_images)
    if sentence:
        log.warning("%s", sentence)
