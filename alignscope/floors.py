"""Floors under a measurement's denominator and its support: below them no number is reported.

Every ``*_error`` divides a distance by the chance distance (the distance between the maps of
two different images) and is measured over the cells a mask keeps valid. Both can shrink until
the ratio is arithmetic without meaning:

- **Denominator.** Chance compares an image with another, unrelated one; an image whose chance
  partner differs from it by less than :data:`CHANCE_FLOOR` of its own norm (in the model's
  normalized pixels) has a near-duplicate for a partner, and its chance distance is no scale.
  The eight bundled photos give 1.0 - 1.7; two copies of a photo one pixel apart give
  0.0026, and were reported at rot90 ``aligned_error`` 29 - 51 "times chance" at the default
  stages. Such an image is left out of every row (``n_near_duplicate``); one whose maps equal its
  partner's (chance distance exactly 0: duplicate images, or a layer that ignores its input) too
  (``n_identical``). The floor is on the images, not on the maps: a layer whose maps are mostly a
  constant (random weights) still compares their image-dependent parts.
- **Support.** A row needs at least :data:`MIN_VALID_CELLS` valid cells and
  :data:`MIN_VALID_FRACTION` of the map's cells; with fewer (``scale100`` keeps 4 of 12,544 cells
  at a stride-2 layer, ``translate224,0`` none) its distances are NaN and ``why_missing`` says so.

A row without a number always carries a ``why_missing`` sentence; the gate never passes it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: this module is read without torch
    import torch

CHANCE_FLOOR = 0.05  # per image: ||x - partner|| / ||x|| in normalized pixels
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
        causes.append(f"{n_near_duplicate} image(s) whose chance partner differs by less than {100 * CHANCE_FLOOR:g}% "
                      "of the image (near-duplicate images: chance is no scale there)")
    if n_nonfinite:
        causes.append(f"{n_nonfinite} image(s) with NaN/inf maps")
    return "no image counted: " + ("; ".join(causes) if causes else "no images were measured")


def near_duplicates(x: "torch.Tensor", partner: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per image (B,) bools: (identical to its chance partner, near-duplicate of it: differing by under the floor).

    ``x`` and ``partner`` are (B, C, H, W) normalized pixels, ``partner[i]`` image i's chance partner.
    """
    difference = (x - partner).flatten(1).double().norm(dim=1)
    scale = x.flatten(1).double().norm(dim=1)
    identical = difference == 0
    return identical, ~identical & (difference < CHANCE_FLOOR * scale)
