"""The spatial warp that best aligns F(g x) with F(x): a search around g^-1.

The analytic alignment samples b = F(g x) at g(p): b'(p) = b(G p), with G
the normalized 3 x 3 matrix of g for the image the map covers (see
:mod:`alignscope.transforms`). A search replaces G by a *sampling matrix*
W and minimizes, over calibration images i,

    mean_i ||M (a_i - b_i(W .))||^2 / chance_i^2,

the mean squared ``aligned_error`` on the fixed valid mask M of g^-1, so the
searched and analytic errors are measured on the same cells.

Two searches:

- ``family``: g's own parameters free (rotation angle, scale, shear; a
  rot90 becomes a free rotation) plus a free translation, because striding
  and asymmetric ("SAME") padding shift a feature map's centre against the
  image's by a fraction of a cell. The result is spelled as a transform g*
  in the grammar, e.g. ``rotate44.2+translate1.3,-0.6`` (g* applied to the
  image moves content where the search says it went).
- ``affine``: all six entries of W free.

Both use a coarse grid over the family, then Adam through ``grid_sample``
from the best starts (g^-1 is always one), and never return anything worse
than g^-1 on the calibration images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import Transform, _fmt

SEARCH_KINDS = ("family", "affine")
# Search units: one Adam step moves a parameter by about lr * unit.
_UNITS = {"rotate": 5.0, "shear": 5.0, "scale": 0.05}
_GRID_STEPS = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)


@dataclass
class WarpFit:
    """A searched warp for one (layer, transform).

    ``matrix``: 3 x 3 normalized sampling matrix W (b'(q) = b(W q)).
    ``spec``: the found transform g* in the transform grammar (family) or
    ``affine[w11,w12,w13;w21,w22,w23]``. ``loss`` and ``analytic_loss``:
    mean squared aligned_error on the calibration images for W and for g^-1.
    """

    kind: str
    matrix: np.ndarray
    spec: str
    loss: float
    analytic_loss: float
    params: dict = field(default_factory=dict)


def sample_with(x: torch.Tensor, matrix: np.ndarray | torch.Tensor, circular: bool = False) -> torch.Tensor:
    """``out(q) = x(W q)`` bilinearly for a (B, C, H, W) map; zeros outside, or wrap-around if ``circular``."""
    theta = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)[:2]
    height, width = x.shape[-2:]
    if circular:
        # Sampling a circularly padded copy: points are rescaled into the padded map's normalized frame.
        pad_y, pad_x = height // 2, width // 2
        x = F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="circular")
        scale = torch.tensor([[width / (width + 2 * pad_x)], [height / (height + 2 * pad_y)]], dtype=theta.dtype, device=theta.device)
        theta = theta * scale
    grid = F.affine_grid(theta.unsqueeze(0).expand(x.shape[0], 2, 3), [x.shape[0], x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Family:
    """g's family: free linear parameters (in spec units) and a free pixel translation."""

    def __init__(self, transform: Transform, height: int, width: int) -> None:
        self.kinds: list[str] = []  # per linear part: rotate | scale | shear | hflip | vflip
        init: list[float] = []
        for part in transform.parts:
            if part.kind in ("rotate", "shear"):
                self.kinds.append(part.kind)
                init.append(part.values[0])
            elif part.kind == "rot90":
                self.kinds.append("rotate")
                init.append(90.0 * int(part.values[0]))
            elif part.kind == "scale":
                self.kinds.append("scale")
                init.append(math.log(part.values[0]))
            elif part.kind in ("hflip", "vflip"):
                self.kinds.append(part.kind)
        pixel = np.eye(3)
        for part in transform.parts:
            pixel = part.pixel_matrix() @ pixel
        self.free = [i for i, k in enumerate(self.kinds) if k in _UNITS]
        self.init = torch.tensor(init + [pixel[0, 2], pixel[1, 2]], dtype=torch.float64)
        self.height, self.width = height, width

    def units(self, cell: float) -> torch.Tensor:
        return torch.tensor([_UNITS[self.kinds[i]] for i in self.free] + [cell, cell], dtype=torch.float64)

    def pixel_matrix(self, values: torch.Tensor) -> torch.Tensor:
        m = torch.eye(3, dtype=torch.float64)
        free = iter(range(len(self.free)))
        for kind in self.kinds:
            part = torch.eye(3, dtype=torch.float64)
            if kind == "rotate":
                angle = torch.deg2rad(values[next(free)])
                c, s = torch.cos(angle), torch.sin(angle)
                part = torch.stack([torch.stack([c, s, c * 0]), torch.stack([-s, c, c * 0]), part[2]])
            elif kind == "scale":
                s = torch.exp(values[next(free)])
                part = torch.stack([torch.stack([s, s * 0, s * 0]), torch.stack([s * 0, s, s * 0]), part[2]])
            elif kind == "shear":
                t = torch.tan(torch.deg2rad(values[next(free)]))
                part = torch.stack([torch.stack([t * 0 + 1, t, t * 0]), part[1], part[2]])
            elif kind == "hflip":
                part[0, 0] = -1
            elif kind == "vflip":
                part[1, 1] = -1
            m = part @ m
        shift = torch.stack([values[-2], values[-1], values[-1] * 0])
        return m + torch.cat([torch.zeros(3, 2, dtype=torch.float64), shift.unsqueeze(1)], dim=1)

    def normalized(self, values: torch.Tensor) -> torch.Tensor:
        to_norm = torch.diag(torch.tensor([2.0 / self.width, 2.0 / self.height, 1.0], dtype=torch.float64))
        from_norm = torch.diag(torch.tensor([self.width / 2.0, self.height / 2.0, 1.0], dtype=torch.float64))
        return to_norm @ self.pixel_matrix(values) @ from_norm

    def spec(self, values: torch.Tensor) -> str:
        pieces, free = [], iter(range(len(self.free)))
        for kind in self.kinds:
            if kind in ("hflip", "vflip"):
                pieces.append(kind)
                continue
            value = float(values[next(free)])
            pieces.append(f"scale{math.exp(value):.4g}" if kind == "scale" else f"{kind}{value:.4g}")
        tx, ty = float(values[-2]), float(values[-1])
        if abs(tx) >= 0.005 or abs(ty) >= 0.005 or not pieces:
            pieces.append(f"translate{_fmt(round(tx, 2))},{_fmt(round(ty, 2))}")
        return "+".join(pieces)

    def params(self, values: torch.Tensor) -> dict:
        out, free = {}, iter(range(len(self.free)))
        for n, kind in enumerate(self.kinds):
            if kind in _UNITS:
                value = float(values[next(free)])
                out[f"{kind}{n}"] = math.exp(value) if kind == "scale" else value
        out["translate_x_px"], out["translate_y_px"] = float(values[-2]), float(values[-1])
        return out


def _mean_sq_error(reference, moved, mask, inv_chance_sq, theta, circular) -> torch.Tensor:
    aligned = sample_with(moved, theta.to(moved.dtype), circular)
    sq = ((reference - aligned).square() * mask).sum(dim=(1, 2, 3), dtype=torch.float64)
    return (sq * inv_chance_sq).mean()


def _descend(loss_of, start: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, float]:
    u = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.02)
    best_u, best = start.clone(), math.inf
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(u)
        value = float(loss.detach())
        if value < best:
            best, best_u = value, u.detach().clone()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        final = float(loss_of(u))
    if final < best:
        best, best_u = final, u.detach().clone()
    return best_u, best


def search_warp(
    reference: torch.Tensor,
    moved: torch.Tensor,
    mask: torch.Tensor,
    chance: torch.Tensor,
    transform: Transform,
    stride: float = 1.0,
    kind: str = "family",
    steps: int = 60,
    start: np.ndarray | None = None,
) -> WarpFit:
    """Search the warp aligning ``moved`` = F(g x) with ``reference`` = F(x).

    ``reference``, ``moved``: (N, C, h, w) calibration maps; ``mask``: (h, w)
    valid cells of g^-1; ``chance``: (N,) chance distances; ``stride``: the
    map's stride (pixel parameters refer to the image of size stride * map).
    ``start``: an extra starting sampling matrix (e.g. the family optimum
    for the affine search). Gradients are taken here, so pass ordinary
    tensors (not created under ``torch.inference_mode``).
    """
    if kind not in SEARCH_KINDS:
        raise ValueError(f"kind must be one of {SEARCH_KINDS}, got {kind!r}")
    reference, moved = reference.detach().float(), moved.detach().float()
    mask = mask.to(reference.dtype)
    inv_chance_sq = (1.0 / chance.to(torch.float64).square()).to(reference.device)
    inv_chance_sq = torch.where(torch.isfinite(inv_chance_sq), inv_chance_sq, torch.zeros_like(inv_chance_sq))
    height, width = reference.shape[-2:]
    circular = transform.circular
    family = _Family(transform, int(round(height * stride)), int(round(width * stride)))
    analytic = family.normalized(family.init)

    def matrix_loss(theta: torch.Tensor) -> torch.Tensor:
        return _mean_sq_error(reference, moved, mask, inv_chance_sq, theta.to(reference.device), circular)

    with torch.no_grad():
        analytic_loss = float(matrix_loss(analytic))
    if kind == "family":
        units = family.units(cell=stride)

        def loss_of(u: torch.Tensor) -> torch.Tensor:
            return matrix_loss(family.normalized(family.init + u * units))

        starts = _grid_starts(loss_of, len(units))
        best_u, best = torch.zeros(len(units), dtype=torch.float64), analytic_loss
        for u0 in starts:
            u, loss = _descend(loss_of, u0, steps, lr=0.2)
            if loss < best:
                best_u, best = u, loss
        values = family.init + best_u * units
        matrix = family.normalized(values).numpy()
        return WarpFit("family", matrix, family.spec(values), best, analytic_loss, family.params(values))

    cell = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
    units = torch.cat([torch.full((2,), 0.05, dtype=torch.float64), cell[:1], torch.full((2,), 0.05, dtype=torch.float64), cell[1:]])
    base = analytic[:2].reshape(-1)

    def loss_of_affine(u: torch.Tensor) -> torch.Tensor:
        top = (base + u * units).reshape(2, 3)
        return matrix_loss(torch.cat([top, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))

    candidates = [torch.zeros(6, dtype=torch.float64)]
    if start is not None:
        candidates.append((torch.as_tensor(start, dtype=torch.float64)[:2].reshape(-1) - base) / units)
    best_u, best = candidates[0], analytic_loss
    for u0 in candidates:
        u, loss = _descend(loss_of_affine, u0, steps, lr=0.2)
        if loss < best:
            best_u, best = u, loss
    matrix = np.eye(3)
    matrix[:2] = (base + best_u * units).reshape(2, 3).numpy()
    spec = "affine[" + ";".join(",".join(f"{v:.4g}" for v in row) for row in matrix[:2]) + "]"
    return WarpFit("affine", matrix, spec, best, analytic_loss, {"matrix": matrix[:2].tolist()})


def _grid_starts(loss_of, n_params: int, keep: int = 2) -> list[torch.Tensor]:
    """g^-1 and the best point of a coarse one-parameter-at-a-time grid around it."""
    origin = torch.zeros(n_params, dtype=torch.float64)
    scored = []
    with torch.no_grad():
        for i in range(n_params):
            steps = _GRID_STEPS if i < n_params - 2 else (-1.0, 1.0)
            for step in steps:
                u = origin.clone()
                u[i] = step
                scored.append((float(loss_of(u)), u))
    scored.sort(key=lambda item: item[0])
    return [origin] + [u for _, u in scored[: keep - 1]]
