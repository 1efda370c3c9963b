"""Warping images and feature maps: pure functions on (B, C, H, W) tensors.

Conventions are those of :mod:`alignscope.geometry.transforms` (normalized
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


# --- registration on a layer's measured lattice ---------------------------------------------------
# A lattice (see :mod:`alignscope.model.lattice_probe`) says where cell (i, j) sits in input pixels (pixel k's
# centre at k). The functions below apply g^-1 in those coordinates instead of the centred frame.


def _normalized_from_index(height: int, width: int) -> np.ndarray:
    """3 x 3 matrix: (column, row, 1) index coordinates -> normalized ``align_corners=False`` coordinates."""
    return np.array([[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]])


def pixel_matrix(transform: Transform, height: int, width: int) -> np.ndarray:
    """g as a 3 x 3 matrix on input pixel coordinates (pixel k's centre at k) of an image ``height`` x ``width``."""
    to_normalized = _normalized_from_index(height, width)
    return np.linalg.inv(to_normalized) @ transform.matrix(height, width) @ to_normalized


def _lattice_matrix(lattice) -> np.ndarray:
    return lattice.cell_to_pixel().numpy()


def registered_sampling_matrix(transform: Transform, lattice, map_size: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Normalized sampling matrix W of g^-1 on the lattice: b'(q) = b(W q) for maps of ``map_size`` (h, w).

    Cell q of the reference sits at input pixel p = L q (``lattice``); its
    content is found in g x at g(p), which is cell L^-1 g(p) of b = F(g x).
    On a centred lattice of an input of exactly ``stride`` pixels per cell
    this is the matrix :func:`inverse_warp` samples with.
    """
    to_normalized = _normalized_from_index(int(map_size[0]), int(map_size[1]))
    cells = _lattice_matrix(lattice)
    g = pixel_matrix(transform, int(image_size[0]), int(image_size[1]))
    return to_normalized @ np.linalg.inv(cells) @ g @ cells @ np.linalg.inv(to_normalized)


def grid_residual(transform: Transform, lattice, map_size: Sequence[int], image_size: Sequence[int],
                  stride: float) -> tuple[float, float] | None:
    """The residual r (x, y input pixels) of an exact g on the lattice, or ``None`` if g is not exact there.

    :func:`inverse_warp` with ``stride`` moves cell k of b = F(g x) to cell
    q; that content came from input pixel g^-1(L k), which is L q + r. r is
    the same for every cell when g maps the lattice onto itself shifted,
    and then b' = g^-1 b compares exactly with F(tau x), tau moving the
    original image by -r (see :func:`registration_shift`).
    """
    height, width = int(map_size[0]), int(map_size[1])
    if not (transform.exact_on(int(image_size[0]), int(image_size[1]), 1.0) and transform.exact_on(height, width, stride)):
        return None
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    index = torch.stack([cols, rows])[None]  # (1, 2, h, w): the (column, row) of every cell
    source = inverse_warp(index, transform, stride, fill=float("nan"))[0].reshape(2, -1)
    target = index[0].reshape(2, -1)
    keep = torch.isfinite(source).all(dim=0)
    if not bool(keep.any()):
        return None
    cells = torch.as_tensor(_lattice_matrix(lattice))
    g_inv = torch.as_tensor(np.linalg.inv(pixel_matrix(transform, int(image_size[0]), int(image_size[1]))))
    ones = torch.ones(1, int(keep.sum()), dtype=torch.float64)
    came_from = g_inv @ cells @ torch.cat([source[:, keep], ones])
    sits_at = cells @ torch.cat([target[:, keep], ones])
    residual = (came_from - sits_at)[:2]
    if float((residual - residual[:, :1]).abs().max()) > 1e-6:
        return None  # not a shifted copy of the lattice: no single translation registers it
    rx, ry = (float(v) for v in residual[:, 0])
    return float(round(rx, 6)) + 0.0, float(round(ry, 6)) + 0.0


def registration_shift(residual: tuple[float, float]) -> Transform:
    """tau: the translation of the original image by -r, so that F(tau x) samples x at L q + r."""
    from .transforms import Part

    return Transform((Part("translate", (-residual[0], -residual[1])),))


def interior_mask(lattice, residual: tuple[float, float], map_size: Sequence[int], image_size: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) 0/1 mask of cells of F(tau x) whose measured support lies inside the image in both frames.

    Zero padding is anchored to each map's own edges (at every layer), and
    tau moves the image against them by r: F(tau x) pads around pixels
    [0, W - 1] of tau x, g^-1 F(g x) around [-r, W - 1 - r] in the same
    coordinates. Only cells whose support stays inside both see no padding
    in either and compare exactly.
    """
    height, width = int(map_size[0]), int(map_size[1])
    image_h, image_w = int(image_size[0]), int(image_size[1])
    xs = lattice.stride_x * torch.arange(width, dtype=torch.float64) + lattice.offset_x
    ys = lattice.stride_y * torch.arange(height, dtype=torch.float64) + lattice.offset_y
    rx, ry = residual
    inside_x = (xs - lattice.reach_x[0] >= max(0.0, -rx)) & (xs + lattice.reach_x[1] <= image_w - 1 - max(0.0, rx))
    inside_y = (ys - lattice.reach_y[0] >= max(0.0, -ry)) & (ys + lattice.reach_y[1] <= image_h - 1 - max(0.0, ry))
    return (inside_y[:, None] & inside_x[None, :]).to(torch.float32).to(device)


def registered_valid_mask(transform: Transform, lattice, map_size: Sequence[int], image_size: Sequence[int],
                          disk: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) mask of cells whose value after the interpolated lattice warp comes from inside the map (>= 0.999 weight)."""
    height, width = int(map_size[0]), int(map_size[1])
    ones = torch.ones(1, 1, height, width, device=device)
    matrix = registered_sampling_matrix(transform, lattice, map_size, image_size)
    mask = (sample_affine(ones, matrix, fill=0.0)[0, 0] >= 0.999).to(torch.float32)
    if disk:
        mask = mask * disk_mask(height, width, shrink_cells=1.0, device=device)
    return mask
