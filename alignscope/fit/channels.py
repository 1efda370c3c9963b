"""Channel remapping after the spatial warp: how much of the misalignment moved between channels.

Per (layer, transform), over the valid cells of the calibration images, the
vectors a = F(x)[:, p] and b' = (g^-1 F(g x))[:, p] (C channels each) are
summarized by :class:`ChannelStatistic` (float64 sums, mergeable across
shards). From it:

- ``fit_linear``: a C x C matrix R minimizing sum_p ||a_p - R b'_p||^2 +
  lambda ||R - I||^2 (ridge, lambda = ``ridge`` x mean eigenvalue of the b'
  Gram matrix), so R b' is the best linear re-mixing of channels. The ridge
  shrinks R towards the identity, i.e. towards "no re-mixing": with too
  few calibration cells for C x C numbers, the map falls back to g^-1 alone
  instead of towards zero;
  :func:`choose_ridge` picks ``ridge`` by two-fold cross-validation between
  two halves of the calibration images, from the statistics alone (the
  squared error of any R is a quadratic form in them);
- ``fit_permutation``: the one-to-one channel assignment minimizing the
  reported objective, sum_p ||a_p - P b'_p||^2 (Hungarian algorithm on the
  C x C cost sum_p (a_i - b'_j)^2 = sum a_i^2 - 2 sum a_i b'_j + sum b'_j^2),
  i.e. the best pure relabelling of channels in L2. The identity is one of
  the candidates, so on the cells it was fitted on it is never worse than
  no relabelling. The Pearson correlation of the matched channels is kept
  as a description only: it ignores scale and offset, so matching on it
  can do worse in L2 than no relabelling at all.

``apply_linear`` / ``apply_permutation`` map a (B, C, h, w) b' onto a's channels.
"""
from __future__ import annotations

import torch

CHANNEL_MAPS = ("linear", "permutation")
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


class ChannelStatistic:
    """Sufficient statistics of (a, b') over valid cells: count, sums, squares and cross products."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum_a = torch.zeros(channels, dtype=torch.float64)
        self.sum_b = torch.zeros(channels, dtype=torch.float64)
        self.sq_a = torch.zeros(channels, dtype=torch.float64)
        self.cross = torch.zeros(channels, channels, dtype=torch.float64)  # sum a_i b_j
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)  # sum b_i b_j

    def update(self, reference: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the valid cells (``mask`` (h, w) > 0) of a batch of (B, C, h, w) maps."""
        if reference.shape != aligned.shape or reference.ndim != 4 or reference.shape[1] != self.channels \
                or tuple(mask.shape) != tuple(reference.shape[-2:]):
            raise ValueError(f"ChannelStatistic({self.channels}) needs reference and aligned (B, {self.channels}, h, w) "
                             f"and mask (h, w); got {tuple(reference.shape)}, {tuple(aligned.shape)}, {tuple(mask.shape)}")
        keep = mask > 0
        a = reference.permute(0, 2, 3, 1)[:, keep].reshape(-1, self.channels).to("cpu", torch.float64)
        b = aligned.permute(0, 2, 3, 1)[:, keep].reshape(-1, self.channels).to("cpu", torch.float64)
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += a.square().sum(0)
        self.cross += a.T @ b
        self.gram += b.T @ b

    def _tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sum_a, self.sum_b, self.sq_a, self.cross, self.gram]

    def merge(self, other: "ChannelStatistic") -> "ChannelStatistic":
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs
        return self

    def sync(self) -> None:
        """Sum the state over all processes of an initialized ``torch.distributed`` group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in self._tensors():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def correlation(self) -> torch.Tensor:
        """(C, C) Pearson correlation between a's channel i and b''s channel j (0 for constant channels)."""
        n = self.count.clamp(min=1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - mean_a[:, None] * mean_b[None, :]
        var_a = (self.sq_a / n - mean_a.square()).clamp(min=0)
        var_b = (torch.diagonal(self.gram) / n - mean_b.square()).clamp(min=0)
        scale = (var_a[:, None] * var_b[None, :]).sqrt()
        return torch.where(scale > 1e-12 * scale.max().clamp(min=1e-300), cov / scale.clamp(min=1e-300), torch.zeros_like(cov))

    def fit_linear(self, ridge: float = 1e-3) -> torch.Tensor:
        """(C, C) float64 R with a ~ R b', shrunk towards I (ridge relative to the Gram matrix's mean eigenvalue)."""
        if self.count == 0:
            raise ValueError("no valid cells were seen; nothing to fit")
        scale = torch.trace(self.gram) / self.channels
        penalty = ridge * max(float(scale), 1e-12) * torch.eye(self.channels, dtype=torch.float64)
        # R (G + lambda I) = cross + lambda I, G symmetric: solve (G + lambda I) R^T = (cross + lambda I)^T.
        return torch.linalg.solve(self.gram + penalty, (self.cross + penalty).T).T

    def squared_error(self, matrix: torch.Tensor) -> float:
        """sum_p ||a_p - R b'_p||^2 over the cells seen, for a (C, C) float64 ``matrix`` R."""
        return float(self.sq_a.sum() - 2 * (matrix * self.cross).sum() + ((matrix @ self.gram) * matrix).sum())

    def pair_costs(self) -> torch.Tensor:
        """(C, C) float64: entry (i, j) = sum over the cells seen of (a_i - b'_j)^2."""
        return self.sq_a[:, None] - 2 * self.cross + torch.diagonal(self.gram)[None, :]

    def permuted_squared_error(self, perm: torch.Tensor) -> float:
        """sum_p ||a_p - b'_perm(p)||^2 over the cells seen: the error after relabelling b' by ``perm``."""
        return max(0.0, float(self.pair_costs()[torch.arange(self.channels), perm].sum()))  # no rounding below 0

    def fit_permutation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm, corr)``: a's channel i is matched with b''s channel ``perm[i]``, minimizing the summed L2 cost.

        ``corr[i]`` is the Pearson correlation of each matched pair (descriptive; not what is optimized).
        When no relabelling beats the identity (ties included), the identity is returned.
        """
        from scipy.optimize import linear_sum_assignment

        if self.count == 0:
            raise ValueError("no valid cells were seen; nothing to fit")
        costs = self.pair_costs()
        rows, cols = linear_sum_assignment(costs.numpy())
        perm = torch.empty(self.channels, dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        identity = torch.arange(self.channels)
        if self.permuted_squared_error(perm) >= self.permuted_squared_error(identity):
            perm = identity
        return perm, self.correlation()[torch.arange(self.channels), perm]


def choose_ridge(first: ChannelStatistic, second: ChannelStatistic, grid=RIDGE_GRID) -> tuple[float, dict[float, float]]:
    """The ridge with the least two-fold cross-validated error (fit on one half, score on the other).

    Returns the chosen ridge and the relative error (error / sum ||a||^2) of each candidate.
    """
    total = float(first.sq_a.sum() + second.sq_a.sum())
    errors = dict.fromkeys(grid, 0.0)
    for fit_on, score_on in ((first, second), (second, first)):
        for ridge, error in zip(grid, _held_out_errors(fit_on, score_on, grid)):
            errors[ridge] += error
    scores = {ridge: error / total if total > 0 else float("nan") for ridge, error in errors.items()}
    best = min(scores, key=lambda r: (scores[r], -r))
    return best, scores


def _held_out_errors(fit_on: ChannelStatistic, score_on: ChannelStatistic, grid) -> list[float]:
    """``score_on.squared_error(fit_on.fit_linear(ridge))`` for every ridge of ``grid``, from one eigendecomposition.

    With G = V diag(L) V^T the fitted half's Gram matrix and X its cross products, the ridge solution
    is R = (X + lambda I) V D V^T with D = diag(1 / (L + lambda)). In V's basis the held-out error
    sum ||a||^2 - 2 tr(R^T X') + tr(R G' R^T) needs, per ridge, only sums weighted by D of products
    computed once, so a ridge costs O(C^2) instead of a solve.
    """
    if fit_on.count == 0:
        raise ValueError("no valid cells were seen; nothing to fit")
    channels = fit_on.channels
    scale = max(float(torch.trace(fit_on.gram) / channels), 1e-12)
    eigenvalues, vectors = torch.linalg.eigh(fit_on.gram)
    cross_v = fit_on.cross @ vectors  # X V
    other_cross_v = score_on.cross @ vectors  # X' V
    other_gram = vectors.T @ score_on.gram @ vectors  # V^T G' V
    # R V = (X V + lambda V) D: tr(R^T X') = sum_j D_j (c1_j + lambda c2_j), and
    # tr(R G' R^T) = d^T [(V^T G' V) o ((XV)^T XV + lambda ((XV)^T V + V^T XV) + lambda^2 I)] d
    c1, c2 = (cross_v * other_cross_v).sum(0), (vectors * other_cross_v).sum(0)
    mixed = cross_v.T @ vectors
    q0, q1, q2 = other_gram * (cross_v.T @ cross_v), other_gram * (mixed + mixed.T), torch.diagonal(other_gram)
    total = float(score_on.sq_a.sum())
    out = []
    for ridge in grid:
        penalty = ridge * scale
        d = 1.0 / (eigenvalues + penalty)
        fitted = float((d * (c1 + penalty * c2)).sum())
        spread = float(d @ (q0 + penalty * q1) @ d + penalty ** 2 * (d * d * q2).sum())
        out.append(total - 2 * fitted + spread)
    return out


def apply_linear(aligned: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """R b' for a (B, C, h, w) map: channel i of the output is sum_j R[i, j] b'_j."""
    return torch.einsum("ij,bjhw->bihw", matrix.to(aligned.device, aligned.dtype), aligned)


def apply_permutation(aligned: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """b' with its channels relabelled: output channel i is b' channel ``perm[i]``."""
    return aligned.index_select(1, perm.to(aligned.device))
