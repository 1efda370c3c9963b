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

from ..errors import AlignscopeError

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


def warn_chance_collapse(table: pd.DataFrame, ratio: float = CHANCE_COLLAPSE_RATIO) -> list[tuple[str, float]]:
    """Log one warning naming the layers whose chance distance is negligible; returns them."""
    collapsed = collapsed_layers(table, ratio)
    if collapsed:
        shown = ", ".join(f"{layer} ({value:.1e})" for layer, value in collapsed[:5])
        more = f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else ""
        log.warning(
            "chance distance collapsed at %d layer(s): %s%s (chance / map norm); these maps barely depend on the "
            "image, so every *_error there divides by almost nothing and is not meaningful (%s)", len(collapsed), shown, more,
            "an exact 0 means the maps of different images are identical: duplicate images, or a layer that ignores "
            "its input" if any(value == 0 for _, value in collapsed) else "random weights? use pretrained ones")
    return collapsed


def nonfinite_layers(table: pd.DataFrame, n_images: int) -> list[str]:
    """Say plainly which layers gave NaN/inf maps for how many images; fail when no number is left."""
    bad = table[table["n_nonfinite"] > 0]
    if bad.empty:
        return []
    per_layer = bad.groupby("layer", sort=False)["n_nonfinite"].max()
    if len(bad) == len(table) and (bad["n_nonfinite"] >= n_images).all():
        raise AlignscopeError(
            f"every feature map was NaN or inf (all {n_images} images at all {table['layer'].nunique()} layers): "
            "the model's computation overflows or its inputs are not finite; nothing to report")
    details = ", ".join(f"{layer} ({count} of {n_images} images)" for layer, count in per_layer.items())
    log.warning("non-finite feature maps (NaN or inf) at %d layer(s): %s; those images are left out of these rows "
                "(column n_nonfinite). The layer overflows or its weights/inputs are broken.", len(per_layer), details)
    return list(per_layer.index)


def warn_left_out(table: pd.DataFrame, n_images: int) -> None:
    """Say so when images were left out because their chance distance was 0."""
    short = table[table["n_images"] + table["n_nonfinite"] < n_images]
    if len(short):
        worst = short.loc[short["n_images"].idxmin()]
        log.warning(
            "%d of %d (layer, transform) rows left images out for a zero chance distance (an image identical "
            "to its partner, or no valid cells); fewest: %d of %d images at %s / %s. Remove duplicate images "
            "or use a milder transform.", len(short), len(table), worst["n_images"], n_images, worst["layer"], worst["transform"])
