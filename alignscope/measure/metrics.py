"""Per-image alignment distances and streaming statistics over images.

Distances are Euclidean norms over the valid cells of a layer (all channels
count equally), accumulated in float64. :class:`AlignmentStatistic` follows
the torchmetrics shape: ``update()`` with a batch, ``compute()`` for the
result, ``merge()``/``sync()`` to reduce state across shards or processes.
Its state is three float64 numbers per quantity (count, sum, sum of squares),
so memory does not grow with the number of images. Quantities that are 0/1
per image (proportions, such as top-1 agreement) get a Wilson score interval
instead of the Student-t one (see :func:`wilson_interval`).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..columns import DISTANCE_QUANTITIES as QUANTITIES, REGISTERED_QUANTITIES  # noqa: F401  (re-exported)


def _masked_sq_norm(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image sum over channels and valid cells of ``diff**2``; (B,) float64.

    Each channel's masked sum over its H x W cells is a float32 matrix-vector
    product (blocked summation, fast); the channel sums are added in float64.
    """
    squared = diff.square()
    return (squared.reshape(diff.shape[0], diff.shape[1], -1) @ mask.reshape(-1)).to(torch.float64).sum(dim=1)


def _masked_sq_dist(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`_masked_sq_norm` of ``x - y`` with one temporary (squared in place)."""
    diff = torch.sub(x, y)
    diff.square_()
    return (diff.reshape(x.shape[0], x.shape[1], -1) @ mask.reshape(-1)).to(torch.float64).sum(dim=1)


def _masked_dot(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image sum over channels and valid cells of ``x * y``; (B,) float64 (as :func:`_masked_sq_norm`)."""
    product = (x * y).reshape(x.shape[0], x.shape[1], -1)
    return (product @ mask.reshape(-1)).to(torch.float64).sum(dim=1)


def reference_terms(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chance distance, squared norm of the reference), both (B,) float64: shared by every transform with this mask."""
    mask = mask.to(reference.dtype)
    return _masked_sq_dist(reference, other, mask).sqrt(), _masked_sq_norm(reference, mask)


def chance_scale(chance: torch.Tensor) -> torch.Tensor:
    """The chance distance as a divisor: NaN where it is 0 (identical maps: no scale at all)."""
    return torch.where(chance > 0, chance, torch.full_like(chance, float("nan")))


def pair_distances(
    reference: torch.Tensor,
    aligned: torch.Tensor,
    unaligned: torch.Tensor,
    other: torch.Tensor,
    mask: torch.Tensor,
    roundtrip: torch.Tensor | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
    terms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image distances for one layer and transform; each value is (B,) float64.

    ``reference`` a = F(x); ``aligned`` b' = g^-1 F(g x); ``unaligned`` b = F(g x);
    ``other`` the feature map of a different image (chance); ``roundtrip``
    F(g^-1 g x) (``None`` for exact transforms: floor 0); ``mask`` (H, W).
    ``extras`` maps a name to another alignment of b (e.g. a searched warp)
    and adds ``name`` and ``name_error`` measured the same way as aligned;
    a (B,) value is taken as per-image squared distances measured by the
    caller (a fit with its own comparison, e.g. a smoothing-charged warp).
    Errors are divided by the chance distance; a chance distance of 0
    (no valid cells, or identical images) gives NaN (near-duplicate images are left out by
    :class:`~alignscope.measure.layers.LayerMeter`, see :mod:`alignscope.floors`). ``terms``: the
    :func:`reference_terms` of (reference, other, mask), if already computed.
    """
    mask = mask.to(reference.dtype)
    chance, reference_sq = terms if terms is not None else reference_terms(reference, other, mask)
    aligned_sq = _masked_sq_dist(reference, aligned, mask)
    aligned_d = aligned_sq.sqrt()
    unaligned_d = _masked_sq_dist(reference, unaligned, mask).sqrt()
    floor_d = torch.zeros_like(chance) if roundtrip is None else _masked_sq_dist(reference, roundtrip, mask).sqrt()
    dot = _masked_dot(reference, aligned, mask)
    # |b'|^2 = |a - b'|^2 - |a|^2 + 2 a.b': no cancellation problem unless |b'| itself is tiny next to |a|
    aligned_norm_sq = (aligned_sq - reference_sq + 2 * dot).clamp(min=0)
    norms = (reference_sq * aligned_norm_sq).sqrt()
    safe_chance = chance_scale(chance)
    extra_values = {}
    for name, candidate in (extras or {}).items():
        if candidate.ndim == 1 and candidate.shape[0] == reference.shape[0]:  # already a per-image squared distance
            distance = candidate.to(torch.float64).sqrt()
        elif candidate.shape == reference.shape:
            distance = _masked_sq_dist(reference, candidate, mask).sqrt()
        else:
            raise ValueError(f"extra {name!r} must be a map like the reference {tuple(reference.shape)} or (B,) squared "
                             f"distances, got {tuple(candidate.shape)}")
        extra_values[name] = distance
        extra_values[f"{name}_error"] = distance / safe_chance
    return extra_values | {
        "aligned": aligned_d,
        "unaligned": unaligned_d,
        "floor": floor_d,
        "chance_distance": chance,
        "reference_norm": reference_sq.sqrt(),  # the map's own scale, against which chance must not vanish
        "aligned_error": aligned_d / safe_chance,
        "unaligned_error": unaligned_d / safe_chance,
        "floor_error": floor_d / safe_chance,
        "aligned_cosine": torch.where(norms > 0, dot / norms, torch.full_like(dot, float("nan"))),
    }


def registered_distances(
    original: torch.Tensor,
    reference: torch.Tensor | None,
    registered: torch.Tensor | None,
    other: torch.Tensor,
    mask: torch.Tensor | None,
    terms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``registered`` and ``registered_error`` per image, (B,) float64: the comparison on the layer's lattice.

    ``original`` F(x); ``reference`` F(tau_r x) (F(x) when the residual is 0
    or g is not exact); ``registered`` g^-1 F(g x) on the lattice; ``other``
    the chance partner's F; ``mask`` the registered mask. The chance distance
    is ||M (F(x) - other)|| on the same mask, so the ratio is comparable with
    ``aligned_error``. All NaN without a lattice. ``terms``:
    :func:`reference_terms` of (original, other, mask) if already computed.
    """
    if reference is None or registered is None or mask is None:
        nan = torch.full((other.shape[0],), float("nan"), dtype=torch.float64, device=other.device)
        return {"registered": nan, "registered_error": nan}
    mask = mask.to(reference.dtype)
    chance = terms[0] if terms is not None else _masked_sq_dist(original, other, mask).sqrt()
    distance = _masked_sq_dist(reference, registered, mask).sqrt()
    return {"registered": distance, "registered_error": distance / chance_scale(chance)}


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (Cornish-Fisher expansion; exact table for dof <= 4)."""
    table = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}
    if dof in table:
        return table[dof]
    z, v = 1.959963984540054, float(dof)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


Z_975 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: float, z: float = Z_975) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n``; (NaN, NaN) for ``n = 0``.

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not
    collapse to a point at 0 or n successes: 8 agreements out of 8 give
    [0.676, 1], not [1, 1].
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denominator
    return max(centre - half, 0.0), min(centre + half, 1.0)


class AlignmentStatistic:
    """Streaming mean, std and 95% confidence interval of per-image quantities.

    Non-finite values (NaN from a zero chance distance) are left out and the
    count says how many images did count. ``proportions``: the quantities
    that are 0 or 1 per image; their interval is :func:`wilson_interval`
    (every other quantity's is the Student-t interval of the mean).
    """

    def __init__(self, quantities: tuple[str, ...] = QUANTITIES, proportions: tuple[str, ...] = ()) -> None:
        unknown = [name for name in proportions if name not in quantities]
        if unknown:
            raise ValueError(f"proportions {unknown} are not among the quantities {quantities}")
        self.quantities = quantities
        self.proportions = tuple(proportions)
        # rows: quantities; columns: count, sum, sum of squares
        self.state = torch.zeros(len(quantities), 3, dtype=torch.float64)

    def update(self, values: Mapping[str, torch.Tensor]) -> None:
        for row, name in enumerate(self.quantities):
            v = values[name].detach().to("cpu", torch.float64).flatten()
            v = v[torch.isfinite(v)]
            self.state[row, 0] += v.numel()
            self.state[row, 1] += v.sum()
            self.state[row, 2] += v.square().sum()

    def merge(self, other: "AlignmentStatistic") -> "AlignmentStatistic":
        self.state += other.state
        return self

    def sync(self) -> None:
        """Sum the state over all processes of an initialized ``torch.distributed`` group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float]:
        """``{q: mean, q_std: sample std, q_ci_low, q_ci_high, q_n}`` for each quantity (95% intervals)."""
        out: dict[str, float] = {}
        for row, name in enumerate(self.quantities):
            n, total, total_sq = (float(v) for v in self.state[row])
            mean = total / n if n else math.nan
            var = max(total_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
            std = math.sqrt(var) if n > 1 else math.nan
            if name in self.proportions:
                low, high = wilson_interval(total, n)
            else:
                half = t_quantile_975(int(n) - 1) * std / math.sqrt(n) if n > 1 else math.nan
                low, high = mean - half, mean + half
            out.update({name: mean, f"{name}_std": std, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": n})
        return out
