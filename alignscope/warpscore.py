"""Scoring candidate warps: batched resampling and the smoothing-charged distance.

:func:`sample_with` / :func:`sample_many` resample a (B, C, H, W) map at one or K
normalized sampling matrices W (output -> input: out(q) = x(W q), ``align_corners=False``).
:class:`WarpObjective` scores candidates against g^-1 on calibration maps, charged for what
the averaging of bilinear resampling alone gains; :func:`charged_sq_distance` is the same
per-image distance for held-out maps. The search itself is :mod:`alignscope.warpsearch`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _sampling_source(x: torch.Tensor, theta: torch.Tensor, circular: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The map to sample and the (..., 2, 3) matrices in its frame: ``x`` itself, or for ``circular``
    a circularly padded copy with the points rescaled into the padded map's normalized frame."""
    if not circular:
        return x, theta
    height, width = x.shape[-2:]
    pad_y, pad_x = height // 2, width // 2
    x = F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="circular")
    scale = torch.tensor([[width / (width + 2 * pad_x)], [height / (height + 2 * pad_y)]], dtype=theta.dtype, device=theta.device)
    return x, theta * scale


def sample_with(x: torch.Tensor, matrix: np.ndarray | torch.Tensor, circular: bool = False) -> torch.Tensor:
    """``out(q) = x(W q)`` bilinearly for a (B, C, H, W) map; zeros outside, or wrap-around if ``circular``.

    ``matrix``: the 3 x 3 (or 2 x 3) normalized sampling matrix W, output -> input (``align_corners=False``).
    """
    theta = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)[:2]
    height, width = x.shape[-2:]
    source, theta = _sampling_source(x, theta, circular)
    grid = F.affine_grid(theta.unsqueeze(0).expand(x.shape[0], 2, 3), [x.shape[0], x.shape[1], height, width], align_corners=False)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_many(x: torch.Tensor, matrices: torch.Tensor, circular: bool = False, mode: str = "bilinear") -> torch.Tensor:
    """``x`` sampled with each of K matrices at once: (B, C, H, W) and (K, 3, 3) -> (B, C, K, H, W).

    One ``grid_sample`` call: the K output grids are stacked along the output height, so the input is
    not copied K times. Equal to stacking :func:`sample_with` over the matrices. ``mode``: ``bilinear``
    or ``nearest`` (the value of the cell the point falls in: the same positions, no averaging).
    """
    height, width = x.shape[-2:]
    theta = matrices[:, :2].to(x.dtype)
    source, theta = _sampling_source(x, theta, circular)
    k = theta.shape[0]
    grid = F.affine_grid(theta, [k, 1, height, width], align_corners=False)  # (K, H, W, 2)
    grid = grid.reshape(1, k * height, width, 2).expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape[0], x.shape[1], k, height, width)


class WarpObjective:
    """Mean over calibration images of the squared aligned_error of candidate sampling matrices, in batches.

    ``reference`` a and ``moved`` b: (N, C, h, w); ``mask``: (h, w) valid cells of g^-1;
    ``chance``: (N,) chance distances; ``analytic``: the 3 x 3 normalized sampling matrix G of
    g^-1 (b' = b(G .)). For a candidate W, with D = G^-1 W its warp relative to g^-1 and
    e = a - b' the mismatch g^-1 leaves, image i contributes

        ||M (a - b(W .))||^2 + smoothing_charge,
        smoothing_charge = ||M e_nearest(D .)||^2 - ||M e_bilinear(D .)||^2

    divided by chance_i^2. Bilinear resampling at fractional positions averages neighbouring
    cells, which lowers an L2 distance by itself whenever part of the mismatch is fine-grained
    and unrelated. The charge is what that averaging alone gains on g^-1's own mismatch: the
    same resampling D applied to a and b' alike (their relative alignment unchanged), bilinear
    against nearest-cell sampling at the same positions (no averaging), so moving the mismatch
    against the mask costs nothing. A candidate counts as better than g^-1 only by what it gains
    beyond resampling. The charge is 0 at D = I, so g^-1 scores its plain error.
    ``smoothing_control=False`` drops the charge (the plain distance).
    Candidates are evaluated ``K`` at a time with :func:`sample_many`, in chunks of at most
    ``budget`` sampled values.
    """

    def __init__(self, reference: torch.Tensor, moved: torch.Tensor, mask: torch.Tensor, chance: torch.Tensor,
                 analytic: torch.Tensor, circular: bool = False, smoothing_control: bool = True,
                 budget: int = 2**24) -> None:
        if reference.shape != moved.shape or reference.ndim != 4 or tuple(mask.shape) != tuple(reference.shape[-2:]) \
                or tuple(chance.shape) != (reference.shape[0],):
            raise ValueError(f"warp search needs reference and moved (N, C, h, w), mask (h, w) and chance (N,); got "
                             f"{tuple(reference.shape)}, {tuple(moved.shape)}, {tuple(mask.shape)}, {tuple(chance.shape)}")
        self.reference, self.moved = reference.detach().float(), moved.detach().float()
        self.mask = mask.to(self.reference.device, self.reference.dtype)
        inv = 1.0 / chance.to(self.reference.device, torch.float64).square()
        self.inv_chance_sq = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
        self.analytic = torch.as_tensor(analytic, dtype=torch.float64)
        self.analytic_inverse = torch.linalg.inv(self.analytic)
        self.circular, self.smoothing_control = circular, smoothing_control
        self.budget = budget
        if smoothing_control:
            self.residual = self.reference - sample_with(self.moved, self.analytic, circular)

    def _masked_sq(self, diff: torch.Tensor) -> torch.Tensor:
        """(N, C, K, h, w) -> (N, K) float64 sums over channels and valid cells."""
        return (diff.square() * self.mask).sum(dim=(1, 3, 4), dtype=torch.float64)

    def plain(self, matrices: torch.Tensor) -> torch.Tensor:
        """(K,) mean squared plain aligned_error of the (K, 3, 3) float64 matrices (no smoothing charge)."""
        return self._evaluate(matrices, charge=False)

    def __call__(self, matrices: torch.Tensor) -> torch.Tensor:
        """(K,) objective of the (K, 3, 3) float64 sampling matrices (the charge carries no gradient)."""
        return self._evaluate(matrices, charge=self.smoothing_control)

    def per_image(self, matrices: torch.Tensor, charge: bool | None = None) -> torch.Tensor:
        """(N, K) float64 squared distances (not divided by chance), charged if ``charge`` (default: as configured)."""
        charge = self.smoothing_control if charge is None else charge
        n, c, h, w = self.reference.shape
        per_chunk = max(1, self.budget // max(1, n * c * h * w * (3 if charge else 1)))
        out = []
        for chunk in torch.split(matrices, per_chunk):
            chunk_dev = chunk.to(self.reference.device)
            sq = self._masked_sq(self.reference.unsqueeze(2) - sample_many(self.moved, chunk_dev, self.circular))
            if charge:
                with torch.no_grad():  # the nearest-cell term is piecewise constant: no gradient to follow
                    relative = self.analytic_inverse.to(chunk_dev.device) @ chunk_dev.detach()
                    averaging_gain = (self._masked_sq(sample_many(self.residual, relative, self.circular, "nearest"))
                                      - self._masked_sq(sample_many(self.residual, relative, self.circular)))
                sq = sq + averaging_gain
            out.append(sq)
        return torch.cat(out, dim=1)

    def _evaluate(self, matrices: torch.Tensor, charge: bool) -> torch.Tensor:
        return (self.per_image(matrices, charge) * self.inv_chance_sq[:, None]).mean(dim=0)


def charged_sq_distance(reference: torch.Tensor, moved: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor,
                        matrix: np.ndarray | torch.Tensor, analytic: np.ndarray | torch.Tensor,
                        circular: bool = False) -> torch.Tensor:
    """(B,) float64 per-image squared distance of the warp ``matrix``, charged for smoothing as in :class:`WarpObjective`.

    ``aligned`` is b' = g^-1 b as the analysis computes it; ``analytic`` is g^-1's sampling matrix.
    A charge can make the sum dip below 0 by rounding (or, for a magnifying warp, by more); it is clamped at 0.
    """
    mask = mask.to(reference.dtype)
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    relative = torch.linalg.inv(torch.as_tensor(analytic, dtype=torch.float64)) @ matrix
    residual = reference - aligned

    def sq(x: torch.Tensor) -> torch.Tensor:
        return (x.square() * mask).sum(dim=(1, 3, 4) if x.ndim == 5 else (1, 2, 3), dtype=torch.float64)

    relative = relative.unsqueeze(0)
    charge = sq(sample_many(residual, relative, circular, "nearest")) - sq(sample_many(residual, relative, circular))
    return (sq(reference - sample_with(moved, matrix, circular)) + charge[:, 0]).clamp(min=0)
