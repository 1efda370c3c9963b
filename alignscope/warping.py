"""Warping images and feature maps: pure functions on (B, C, H, W) tensors.

Conventions are those of :mod:`alignscope.transforms` (normalized
coordinates, ``align_corners=False``). A feature map of ``stride`` s covers
an image ``s`` times its size, so pixel quantities (translations) are divided
by s and the normalized matrix is built for the image size ``(s*H, s*W)``.

Transforms that map grid cells onto grid cells (flips, rot90 on square maps,
translations by multiples of the stride) are applied with index operations
and are exact; everything else is resampled bilinearly with ``grid_sample``,
filling what comes from outside the map with ``fill``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import Part, Transform

Fill = Union[float, Sequence[float], torch.Tensor]


def _fill_tensor(fill: Fill, x: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return value.reshape(1, -1, 1, 1) if value.ndim == 1 else value


def sample_affine(x: torch.Tensor, matrix: np.ndarray, fill: Fill = 0.0) -> torch.Tensor:
    """Output at normalized point q = x bilinearly sampled at ``matrix @ q``; outside = ``fill``."""
    theta = torch.as_tensor(matrix[:2], dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill_value = _fill_tensor(fill, x)
    return F.grid_sample(x - fill_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill_value


def shift_cells(x: torch.Tensor, dx: int, dy: int, circular: bool = False, fill: Fill = 0.0) -> torch.Tensor:
    """Move content ``dx`` cells right and ``dy`` cells down, wrapping around or filling."""
    if circular:
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    height, width = x.shape[-2:]
    out = torch.empty_like(x)
    out.copy_(_fill_tensor(fill, x).expand_as(x))
    if abs(dx) >= width or abs(dy) >= height:
        return out
    src_y = slice(max(0, -dy), height - max(0, dy))
    dst_y = slice(max(0, dy), height - max(0, -dy))
    src_x = slice(max(0, -dx), width - max(0, dx))
    dst_x = slice(max(0, dx), width - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def _apply_exact_part(x: torch.Tensor, part: Part, stride: float, fill: Fill) -> torch.Tensor:
    if part.kind == "identity":
        return x
    if part.kind == "hflip":
        return x.flip(-1)
    if part.kind == "vflip":
        return x.flip(-2)
    if part.kind == "rot90":
        # dims (H, W): turns the down direction towards the right, i.e. counter-clockwise on screen.
        return torch.rot90(x, int(part.values[0]) % 4, dims=(-2, -1))
    if part.kind in ("translate", "roll"):
        dx, dy = (int(round(v / stride)) for v in part.values)
        return shift_cells(x, dx, dy, circular=part.kind == "roll", fill=fill)
    raise ValueError(f"{part.spec} is not exact on a grid")


def _roll_fractional(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Circular shift by fractional cells: bilinear blend of the four neighbouring integer rolls."""
    x0, y0 = math.floor(dx), math.floor(dy)
    fx, fy = dx - x0, dy - y0
    out = torch.zeros_like(x)
    for ox, wx in ((x0, 1 - fx), (x0 + 1, fx)):
        for oy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
            if wx * wy > 0:
                out += (wx * wy) * torch.roll(x, shifts=(oy, ox), dims=(-2, -1))
    return out


def is_exact(transform: Transform, x_shape: Sequence[int], stride: float = 1.0) -> bool:
    """Whether :func:`warp` applies ``transform`` to a map of ``x_shape`` with index operations only."""
    return transform.exact_on(int(x_shape[-2]), int(x_shape[-1]), stride)


def warp(x: torch.Tensor, transform: Transform, stride: float = 1.0, fill: Fill = 0.0) -> torch.Tensor:
    """Move the content of ``x`` (B, C, H, W) by ``transform``: out(g(p)) = x(p).

    ``stride`` is the map's stride relative to the image the transform's
    pixel parameters refer to; ``fill`` (scalar or per channel) replaces
    content from outside the map.
    """
    height, width = x.shape[-2:]
    if transform.exact_on(height, width, stride):
        for part in transform.parts:
            x = _apply_exact_part(x, part, stride, fill)
        return x
    if transform.circular:
        tx, ty = transform.total_shift()
        return _roll_fractional(x, tx / stride, ty / stride)
    matrix = transform.matrix(int(round(height * stride)), int(round(width * stride)))
    return sample_affine(x, np.linalg.inv(matrix), fill)


def inverse_warp(x: torch.Tensor, transform: Transform, stride: float = 1.0, fill: Fill = 0.0) -> torch.Tensor:
    """Undo ``transform`` on ``x``: out(p) = x(g(p)). Feature maps of g(image) are aligned with this."""
    return warp(x, transform.inverse(), stride, fill)


def disk_mask(height: int, width: int, shrink_cells: float = 0.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) float mask of the centred inscribed disk, its radius reduced by ``shrink_cells``."""
    ys = torch.arange(height, device=device, dtype=torch.float64) + 0.5 - height / 2
    xs = torch.arange(width, device=device, dtype=torch.float64) + 0.5 - width / 2
    radius = min(height, width) / 2 - shrink_cells
    inside = ys[:, None] ** 2 + xs[None, :] ** 2 <= radius**2 + 1e-9
    return inside.to(torch.float32)


def valid_mask(
    transform: Transform,
    height: int,
    width: int,
    stride: float = 1.0,
    disk: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(H, W) 0/1 mask of cells whose value after :func:`inverse_warp` comes from inside the map.

    A resampled cell counts when at least 0.999 of its interpolation weight
    lies inside. With ``disk`` the cell must also lie inside the centred disk
    shrunk by one cell (the content both images share under disk masking).
    """
    ones = torch.ones(1, 1, height, width, device=device)
    mask = (inverse_warp(ones, transform, stride, fill=0.0)[0, 0] >= 0.999).to(torch.float32)
    if disk:
        mask = mask * disk_mask(height, width, shrink_cells=1.0, device=device)
    return mask
