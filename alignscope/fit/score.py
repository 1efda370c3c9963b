"""Scoring candidate warps: batched resampling and the smoothing-charged distance.

:func:`sample_with` / :func:`sample_many` resample a (B, C, H, W) map at one or K
normalized sampling matrices W (output -> input: out(q) = x(W q), ``align_corners=False``).
:class:`WarpObjective` scores candidates against g^-1 on calibration maps, charged for what
the averaging of bilinear resampling alone gains, and gives the Gauss-Newton terms of the
plain distance in W's six entries (:meth:`WarpObjective.gauss_newton`) that the descent uses;
:func:`charged_sq_distance` is the same per-image distance for held-out maps. The search itself
is :mod:`alignscope.fit.search`.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F


def _sampling_source(x: torch.Tensor, theta: torch.Tensor, circular: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The map to sample and the (..., 2, 3) matrices in its frame: ``x`` itself, or for ``circular``
    a circularly padded copy with the points rescaled into the padded map's normalized frame."""
    if not circular:
        return x, theta
    height, width = x.shape[-2:]
    return F.pad(x, (width // 2, width // 2, height // 2, height // 2), mode="circular"), _padded_frame(theta, height, width)


def _padded_frame(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 2, 3) matrices of an (height, width) map rescaled into the frame of its circularly padded copy."""
    scale = torch.tensor([[width / (width + 2 * (width // 2))], [height / (height + 2 * (height // 2))]],
                         dtype=theta.dtype, device=theta.device)
    return theta * scale


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


class GradientSampler:
    """Samples a (B, C, H, W) map with K sampling matrices at once, with the exact derivatives of the samples.

    ``sampler(matrices)`` for (K, 3, 3) matrices returns three (B, C, K, H, W) tensors: out(q) = x(W q)
    as :func:`sample_many` (bilinear, zeros outside or wrap-around if ``circular``), and d out / d p_x,
    d out / d p_y, the derivatives of the bilinear interpolant with respect to the sampling point
    p = W q in normalized coordinates. Exact: within a cell the interpolant's x-derivative is the
    difference of the two columns the point lies between, interpolated along y only, which is what
    is sampled (a point exactly on a column takes the difference to the next column). The padded
    source and its differences are built once, here.
    """

    def __init__(self, x: torch.Tensor, circular: bool = False) -> None:
        self.height, self.width = x.shape[-2:]
        self.circular = circular
        self.source = _sampling_source(x, torch.zeros(1, 2, 3, dtype=x.dtype, device=x.device), circular)[0]
        # Column m of diff_x is source column m - 1 subtracted from column m (zeros beyond the map, as
        # grid_sample sees them), centred at source column m - 1/2: a point between columns j and j + 1
        # takes diff_x's column j + 1, sampled at that column's centre so that only y interpolates.
        padded = F.pad(self.source, (1, 1))
        self.diff_x = padded[..., 1:] - padded[..., :-1]
        padded = F.pad(self.source, (0, 0, 1, 1))
        self.diff_y = padded[..., 1:, :] - padded[..., :-1, :]

    def _grid(self, matrices: torch.Tensor) -> torch.Tensor:
        theta = matrices[:, :2].to(self.source.dtype)
        theta = _padded_frame(theta, self.height, self.width) if self.circular else theta
        return F.affine_grid(theta, [theta.shape[0], 1, self.height, self.width], align_corners=False)  # (K, H, W, 2)

    def _sample(self, src: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        batch, channels = self.source.shape[:2]
        k, height, width = points.shape[:3]
        points = points.reshape(1, k * height, width, 2).expand(batch, -1, -1, -1)
        out = F.grid_sample(src, points, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(batch, channels, k, height, width)

    def values(self, matrices: torch.Tensor) -> torch.Tensor:
        """The samples alone, (B, C, K, H, W): the first of what calling the sampler returns, at a third of the cost."""
        return self._sample(self.source, self._grid(matrices))

    def derivatives(self, matrices: torch.Tensor, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """d out / d p_x and d out / d p_y alone, (B, C, K, H, W) each: the last two of what calling the sampler returns."""
        source, sample = self.source, self._sample
        src_h, src_w = source.shape[-2:]
        grid = self._grid(matrices) if grid is None else grid  # (K, H, W, 2): x, y
        column = torch.floor(((grid[..., 0] + 1) * src_w - 1) / 2) + 1
        d_x = sample(self.diff_x, torch.stack([(2 * column + 1) / (src_w + 1) - 1, grid[..., 1]], dim=-1))
        row = torch.floor(((grid[..., 1] + 1) * src_h - 1) / 2) + 1
        d_y = sample(self.diff_y, torch.stack([grid[..., 0], (2 * row + 1) / (src_h + 1) - 1], dim=-1))
        # pixel -> normalized: d/dp = (size / 2) d/dpixel in the source frame, times the circular padding's rescaling
        return d_x.mul_(self.width / 2), d_y.mul_(self.height / 2)

    def __call__(self, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self._grid(matrices)
        return (self._sample(self.source, grid), *self.derivatives(matrices, grid))


def sample_with_gradient(x: torch.Tensor, matrices: torch.Tensor, circular: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (B, C, H, W) sampled with (K, 3, 3) matrices and the samples' exact derivatives; see :class:`GradientSampler`."""
    return GradientSampler(x, circular)(matrices)


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
    ``budget`` sampled values, in ``dtype`` (sums in float64).
    """

    def __init__(self, reference: torch.Tensor, moved: torch.Tensor, mask: torch.Tensor, chance: torch.Tensor,
                 analytic: torch.Tensor, circular: bool = False, smoothing_control: bool = True,
                 budget: int = 2**24, dtype: torch.dtype = torch.float32) -> None:
        if reference.shape != moved.shape or reference.ndim != 4 or tuple(mask.shape) != tuple(reference.shape[-2:]) \
                or tuple(chance.shape) != (reference.shape[0],):
            raise ValueError(f"warp search needs reference and moved (N, C, h, w), mask (h, w) and chance (N,); got "
                             f"{tuple(reference.shape)}, {tuple(moved.shape)}, {tuple(mask.shape)}, {tuple(chance.shape)}")
        self.reference, self.moved = reference.detach().to(dtype), moved.detach().to(dtype)
        self.mask = mask.to(self.reference.device, self.reference.dtype)
        self.chance = chance
        inv = 1.0 / chance.to(self.reference.device, torch.float64).square()
        self.inv_chance_sq = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
        self.analytic = torch.as_tensor(analytic, dtype=torch.float64)
        self.analytic_inverse = torch.linalg.inv(self.analytic)
        self.circular, self.smoothing_control = circular, smoothing_control
        self.budget = budget
        self._score_cache: dict[tuple, tuple[float, float]] = {}
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

    def pyramid(self, coarsest: int) -> list["WarpObjective"]:
        """Plain objectives on 2 x 2 averages of the maps, coarsest first, ending with this one.

        A level is added while the finer map's sides are even and the coarser one's stay at least
        ``coarsest`` cells. Averaging 2 x 2 blocks keeps the normalized frame (a block's centre is
        its cells' mean), so a sampling matrix means the same warp on every level; a coarse cell is
        valid where all four of its cells are. Per-image weights (1 / chance^2) are kept.
        """
        levels = [self]
        while True:
            finest = levels[0]
            height, width = finest.reference.shape[-2:]
            if height % 2 or width % 2 or min(height, width) // 2 < coarsest:
                return levels
            coarse = WarpObjective(F.avg_pool2d(finest.reference, 2), F.avg_pool2d(finest.moved, 2),
                                   -F.max_pool2d(-finest.mask[None, None], 2)[0, 0], self.chance, self.analytic,
                                   self.circular, False, self.budget, self.reference.dtype)
            levels.insert(0, coarse)

    def scores(self, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) charged and (K,) plain objective of the (K, 3, 3) float64 matrices, from one resampling of each
        (charged = plain where ``smoothing_control`` is off).

        Scores are remembered per matrix (entries rounded to 1e-12): searches sharing this objective
        (the affine search starts where the family search ended) do not score a warp twice.
        """
        keys = [tuple(row) for row in torch.round(matrices[:, :2].reshape(-1, 6).double().cpu() * 1e12).tolist()]
        todo = [i for i, key in enumerate(keys) if key not in self._score_cache]
        if todo:
            plain, gain = self._distances(matrices[todo], self.smoothing_control)
            charged = plain if gain is None else plain + gain
            for i, charged_i, plain_i in zip(todo, self._weighted(charged).tolist(), self._weighted(plain).tolist()):
                self._score_cache[keys[i]] = (charged_i, plain_i)
        charged, plain = zip(*(self._score_cache[key] for key in keys))
        return torch.tensor(charged, dtype=torch.float64), torch.tensor(plain, dtype=torch.float64)

    def per_image(self, matrices: torch.Tensor, charge: bool | None = None) -> torch.Tensor:
        """(N, K) float64 squared distances (not divided by chance), charged if ``charge`` (default: as configured)."""
        plain, gain = self._distances(matrices, self.smoothing_control if charge is None else charge)
        return plain if gain is None else plain + gain

    def _distances(self, matrices: torch.Tensor, charge: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, K) plain squared distances of the candidates and, if ``charge``, their (N, K) averaging gains."""
        plain, gains = [], []
        for chunk in self._chunks(matrices, 3 if charge else 1):
            plain.append(self._masked_sq(self.reference.unsqueeze(2) - sample_many(self.moved, chunk, self.circular)))
            if charge:
                gains.append(self._averaging_gain(chunk))
        return torch.cat(plain, dim=1), torch.cat(gains, dim=1) if charge else None

    def gauss_newton(self, matrices: torch.Tensor, mismatch: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plain objective at (K, 3, 3) matrices with its gradient and Gauss-Newton matrix in W's top six entries.

        Returns float64 ``loss`` (K,), ``gradient`` (K, 6) and ``hessian`` (K, 6, 6), entries ordered
        w11, w12, w13, w21, w22, w23. With residuals r = a - b(W q) and J = dr/dW (from the exact
        derivatives of the bilinear interpolant, :class:`GradientSampler`), gradient = 2 J^T r and
        hessian = 2 J^T J, each term weighted like the loss (1 / chance^2 per image, the mask per cell).
        No autograd. The loss agrees with :meth:`plain` up to float32 rounding (the weights are applied
        before the sums, not after). ``mismatch``: the (rows, K, h w) residuals of these very matrices as
        :meth:`descent_loss` kept them; then only the derivatives are sampled.
        """
        # 1 / chance^2 and the 1 / N of the mean folded into the maps (as square roots), the mask into the
        # per-cell sums: then every sum over images and channels is a plain one over contiguous rows.
        reference, sampler = self._weighted_maps
        n, c, h, w = reference.shape
        mask = self.mask.reshape(1, h * w).double()
        losses, gradients, hessians = [], [], []
        chunks = self._chunks(matrices, 3)
        if mismatch is not None and len(chunks) > 1:
            mismatch = None  # kept for one chunk only; the rare split case samples again
        for chunk in chunks:
            k = len(chunk)
            if mismatch is not None:
                diff = mismatch.reshape(n * c, k * h * w)
                d_x, d_y = (t.reshape(n * c, k * h * w) for t in sampler.derivatives(chunk))
            else:
                values, d_x, d_y = (t.reshape(n * c, k * h * w) for t in sampler(chunk))
                diff = self._mismatch(reference, values, k)
                del values
            sums = torch.stack([(diff * diff).sum(0), (diff * d_x).sum(0), (diff * d_y).sum(0),
                                (d_x * d_x).sum(0), (d_x * d_y).sum(0), (d_y * d_y).sum(0)])
            sums = sums.double().reshape(6, k, h * w) * mask  # per cell: r.r, r.gx, r.gy, gx.gx, gx.gy, gy.gy
            losses.append(sums[0].sum(dim=1))
            # moments over the cells' homogeneous coordinates: d(W q)_i / dW_ij = q_j
            gradients.append(-2 * (sums[1:3] @ self._coords).transpose(0, 1).reshape(k, 6))  # (i, k, j) -> (k, i j)
            hessian = (sums[[3, 4, 4, 5]] @ self._coord_products).reshape(2, 2, k, 3, 3)  # (i, I, k, j, J)
            hessians.append(2 * hessian.permute(2, 0, 3, 1, 4).reshape(k, 6, 6))
        return torch.cat(losses), torch.cat(gradients), torch.cat(hessians)

    def descent_loss(self, matrices: torch.Tensor, keep: bool = False):
        """(K,) float64 plain objective computed exactly as :meth:`gauss_newton` computes its loss, from the samples alone.

        The descent compares a trial point's loss with the current one's; both come from the same
        operations in the same order, so a comparison is never decided by rounding differences.
        ``keep``: return ``(loss, mismatch)``, the residuals as (rows, K, h w) for :meth:`gauss_newton`
        (``None`` when the candidates needed more than one chunk).
        """
        reference, sampler = self._weighted_maps
        n, c, h, w = reference.shape
        mask = self.mask.reshape(1, h * w).double()
        losses, kept = [], []
        for chunk in self._chunks(matrices, 1):
            k = len(chunk)
            diff = self._mismatch(reference, sampler.values(chunk).reshape(n * c, k * h * w), k)
            losses.append(((diff * diff).sum(0).double().reshape(k, h * w) * mask).sum(dim=1))
            kept.append(diff)
        if not keep:
            return torch.cat(losses)
        mismatch = kept[0].reshape(n * c, len(matrices), h * w) if len(kept) == 1 else None
        return torch.cat(losses), mismatch

    @staticmethod
    def _mismatch(reference: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
        """(N C, K h w) rows of a - b(W .) for the K candidates, from (N C, K h w) rows of samples."""
        n, c, h, w = reference.shape
        return (reference.unsqueeze(2) - values.reshape(n, c, k, h, w)).reshape(n * c, k * h * w)

    @cached_property
    def _weighted_maps(self) -> tuple[torch.Tensor, GradientSampler]:
        """The reference and a sampler of the moved maps, each image scaled by sqrt(1 / (N chance^2)).

        With more (image, channel) rows than twice the cells (deep layers: many channels, small maps)
        the N C rows of [a | b] are replaced by the 2 h w rows of R from its QR decomposition. Every
        term of the descent (loss, gradient, Gauss-Newton matrix) is a sum over rows of products of
        a_r and linear functions of b_r (sampling and its derivatives are linear in the map), i.e. a
        function of [a | b]^T [a | b] = R^T R, so the reduced rows give the same terms exactly (up to
        rounding), at a fraction of the resampling.
        """
        dtype = self.reference.dtype
        scale = (self.inv_chance_sq / self.reference.shape[0]).sqrt().to(dtype)[:, None, None, None]
        reference, moved = self.reference * scale, self.moved * scale
        n, c, h, w = reference.shape
        if n * c > 2 * h * w:
            rows = torch.cat([reference.reshape(n * c, h * w), moved.reshape(n * c, h * w)], dim=1).double()
            reduced = torch.linalg.qr(rows, mode="r")[1]  # (2 h w, 2 h w), R^T R = rows^T rows
            reference = reduced[:, :h * w].reshape(1, 2 * h * w, h, w).to(dtype)
            moved = reduced[:, h * w:].reshape(1, 2 * h * w, h, w).to(dtype)
        return reference, GradientSampler(moved, self.circular)

    @cached_property
    def _coord_products(self) -> torch.Tensor:
        """(h * w, 9) outer products q q^T of the cells' homogeneous coordinates, flattened row-major."""
        return (self._coords[:, :, None] * self._coords[:, None, :]).reshape(-1, 9)

    @cached_property
    def _coords(self) -> torch.Tensor:
        """(h * w, 3) float64 homogeneous normalized coordinates (x, y, 1) of the cells, row-major."""
        h, w = self.reference.shape[-2:]
        ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
        xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1), torch.ones(h * w, dtype=torch.float64)], dim=1).to(self.reference.device)

    def _chunks(self, matrices: torch.Tensor, samples: int):
        """``matrices`` on the maps' device in chunks of at most ``budget`` values over ``samples`` resamplings."""
        n, c, h, w = self.reference.shape
        per_chunk = max(1, self.budget // max(1, n * c * h * w * samples))
        return torch.split(matrices.to(self.reference.device), per_chunk)

    def _averaging_gain(self, chunk: torch.Tensor) -> torch.Tensor:
        """(N, K) what bilinear averaging alone gains on g^-1's mismatch under each warp relative to g^-1."""
        with torch.no_grad():  # the nearest-cell term is piecewise constant: no gradient to follow
            relative = self.analytic_inverse.to(chunk.device) @ chunk.detach()
            return (self._masked_sq(sample_many(self.residual, relative, self.circular, "nearest"))
                    - self._masked_sq(sample_many(self.residual, relative, self.circular)))

    def _weighted(self, per_image: torch.Tensor) -> torch.Tensor:
        return (per_image * self.inv_chance_sq[:, None]).mean(dim=0)

    def _evaluate(self, matrices: torch.Tensor, charge: bool) -> torch.Tensor:
        return self._weighted(self.per_image(matrices, charge))


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
