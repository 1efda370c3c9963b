"""Checks on a finished alignment table that a reader must hear about.

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
