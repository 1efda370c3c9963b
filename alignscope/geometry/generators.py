"""Continuous transformations at the identity: the generators of the Lie derivatives.

A one-parameter family g_t (g_0 the identity) moves content along a vector field v: a point p of
the original sits at p + t v(p) + O(t²) in g_t x. In alignscope's coordinate convention
(:mod:`alignscope.geometry.transforms`: origin at the image centre, x right, y down, pixel units for
the geometry, normalized coordinates ±1 at the outer pixel edges) the generators are

==============  =====================  ======================================================
name            v(x, y), pixels         unit of t
==============  =====================  ======================================================
translate_x     (W/2, 0)               one normalized coordinate (half the image width)
translate_y     (0, H/2)               one normalized coordinate (half the image height)
rotate          (y, −x)                radian, counter-clockwise on screen (as ``rotateA``)
scale           (x, y)                 unit of log-scale (``scale`` e^t)
shear_x         (y, 0)                 unit of tan(angle) (as ``shearA``: x' = x + tan(A) y)
shear_y         (0, x)                 the same along y
==============  =====================  ======================================================

:func:`cell_displacement` gives v on any map with the image's aspect ratio in *cells* of that map
per unit t (the centred frame: the cell centres at normalized (2j + 1)/w − 1), so one field serves
the image (its pixels are its cells) and every feature map, whatever its stride.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Field = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Generator:
    """One continuous transformation at the identity (see the module docstring)."""

    name: str
    unit: str
    field: Field  # (x, y pixels from the centre, W, H) -> (vx, vy) pixels per unit t
    disk: bool  # compared inside the centred disk under ``mask="auto"`` (rotations and shears, as the transforms)


GENERATORS: dict[str, Generator] = {g.name: g for g in (
    Generator("translate_x", "per normalized coordinate (half the image width)",
              lambda x, y, W, H: (torch.full_like(x, W / 2), torch.zeros_like(y)), False),
    Generator("translate_y", "per normalized coordinate (half the image height)",
              lambda x, y, W, H: (torch.zeros_like(x), torch.full_like(y, H / 2)), False),
    Generator("rotate", "per radian (counter-clockwise)", lambda x, y, W, H: (y, -x), True),
    Generator("scale", "per unit of log-scale", lambda x, y, W, H: (x, y), False),
    Generator("shear_x", "per unit of tan(shear angle)", lambda x, y, W, H: (y, torch.zeros_like(y)), True),
    Generator("shear_y", "per unit of tan(shear angle)", lambda x, y, W, H: (torch.zeros_like(x), x), True),
)}


def cell_displacement(generator: Generator, height: int, width: int, image_hw: tuple[int, int],
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(dj, di): how far, in cells of a (height, width) map per unit t, the content at each cell moves along
    x and y under ``generator``; each (height, width), float64."""
    image_h, image_w = (float(v) for v in image_hw)
    xn = (2 * torch.arange(width, dtype=torch.float64, device=device) + 1) / width - 1
    yn = (2 * torch.arange(height, dtype=torch.float64, device=device) + 1) / height - 1
    yn, xn = torch.meshgrid(yn, xn, indexing="ij")
    vx, vy = generator.field(xn * image_w / 2, yn * image_h / 2, image_w, image_h)  # pixels per unit t
    return vx / (image_w / 2) * (width / 2), vy / (image_h / 2) * (height / 2)


def directional_difference(maps: torch.Tensor, dj: torch.Tensor, di: torch.Tensor,
                           fill: float | Sequence[float] = 0.0, difference: str = "central") -> torch.Tensor:
    """(dj ∂_j + di ∂_i) of ``maps`` (B, C, h, w) by central differences, the maps extended by ``fill`` (a scalar
    or one value per channel) beyond their edges: what a warp brings in from outside (black for images, 0 for
    maps). Returns the rate at which content moving along (dj, di) cells per unit t changes each cell.
    ``difference="forward"``: the next cell minus this one instead, what differentiating bilinear sampling
    at the sample points gives (for comparing with tools that do; alignscope measures with the central one)."""
    if difference not in ("central", "forward"):
        raise ValueError(f"difference must be 'central' or 'forward', got {difference!r}")
    value = torch.as_tensor(fill, dtype=maps.dtype, device=maps.device).reshape(1, -1, 1, 1)
    padded = value + torch.nn.functional.pad(maps - value, (1, 1, 1, 1))
    if difference == "central":
        grad_j = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
        grad_i = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    else:
        grad_j = padded[..., 1:-1, 2:] - padded[..., 1:-1, 1:-1]
        grad_i = padded[..., 2:, 1:-1] - padded[..., 1:-1, 1:-1]
    return dj.to(maps.dtype) * grad_j + di.to(maps.dtype) * grad_i
