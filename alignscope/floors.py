"""Floors under a measurement's denominator and its support: below them no number is reported.

Every ``*_error`` divides a distance by the chance distance (the distance between the maps of
two different images) and is measured over the cells a mask keeps valid. Both can shrink until
the ratio is arithmetic without meaning:

- **Denominator.** Per image, the chance distance must be at least :data:`CHANCE_FLOOR` of the
  reference map's own norm ‖M a‖. Unrelated images give 0.5 - 1.5 on pretrained and random
  networks alike (tf_efficientnet_lite0, resnet18, convnext_tiny, vit_tiny, mobilenetv3 at their
  default stages); two copies of a photo that differ in one pixel give 0.015 - 0.03, and their
  aligned errors read 29 - 51 "times chance". An image below the floor is left out of the row
  (``n_near_duplicate``); one with a chance distance of exactly 0 (identical maps) too
  (``n_identical``).
- **Support.** A row needs at least :data:`MIN_VALID_CELLS` valid cells and
  :data:`MIN_VALID_FRACTION` of the map's cells; with fewer (``scale100`` keeps 4 of 12,544 cells
  at a stride-2 layer, ``translate224,0`` none) its distances are NaN and ``why_missing`` says so.

A row without a number always carries a ``why_missing`` sentence; the gate never passes it.
"""
from __future__ import annotations

CHANCE_FLOOR = 0.05  # per image: chance distance / reference map norm
MIN_VALID_CELLS = 4
MIN_VALID_FRACTION = 0.01


def support_shortfall(valid_cells: int, total_cells: int) -> str:
    """Why a row with ``valid_cells`` of ``total_cells`` has too little support to report ("" when it has enough)."""
    if valid_cells == 0:
        return "no valid cells: the transform moves every cell of this map out of view"
    needed = max(MIN_VALID_CELLS, MIN_VALID_FRACTION * total_cells)
    if valid_cells < needed:
        return (f"too few valid cells: {valid_cells} of {total_cells} ({100 * valid_cells / total_cells:.2g}%), below "
                f"the floor of {MIN_VALID_CELLS} cells and {100 * MIN_VALID_FRACTION:g}% of the map")
    return ""


def images_shortfall(n_images: int, n_identical: int, n_near_duplicate: int, n_nonfinite: int) -> str:
    """Why a row in which no image counted has no number ("" when some image counted)."""
    if n_images > 0:
        return ""
    causes = []
    if n_identical:
        causes.append(f"{n_identical} image(s) whose maps equal their chance partner's (duplicate images, or a layer "
                      "that ignores its input)")
    if n_near_duplicate:
        causes.append(f"{n_near_duplicate} image(s) whose chance distance is below {100 * CHANCE_FLOOR:g}% of the "
                      "map's norm (near-duplicate images: chance is no scale there)")
    if n_nonfinite:
        causes.append(f"{n_nonfinite} image(s) with NaN/inf maps")
    return "no image counted: " + ("; ".join(causes) if causes else "no images were measured")
