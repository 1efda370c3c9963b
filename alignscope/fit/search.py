"""The spatial warp that best aligns F(g x) with F(x): a search around g^-1.

The analytic alignment samples b = F(g x) at g(p): b'(p) = b(G p), with G
the normalized 3 x 3 matrix of g for the image the map covers (see
:mod:`alignscope.geometry.transforms`). A search replaces G by a *sampling matrix*
W and minimizes, over calibration images i,

    mean_i (||M (a_i - b_i(W .))||^2 + smoothing charge_i) / chance_i^2,

the mean squared ``aligned_error`` on the fixed valid mask M of g^-1, so the
searched and analytic errors are measured on the same cells. The charge
(:class:`WarpObjective`) is what the averaging of bilinear resampling alone
gains; without it a search wins by blurring b' even where g^-1 is exact.

Two searches:

- ``family``: g's own parameters free (rotation angle, scale, shear; a
  rot90 becomes a free rotation) plus a free translation, because striding
  and asymmetric ("SAME") padding shift a feature map's centre against the
  image's by a fraction of a cell. The result is spelled as a transform g*
  in the grammar, e.g. ``rotate44.2+translate1.3,-0.6`` (g* applied to the
  image moves content where the search says it went).
- ``affine``: all six entries of W free.

Both descend by Levenberg-Marquardt (damped Gauss-Newton) from several
starts at once (g^-1, extra ``starts`` and, for ``family``, the best point
of a coarse grid), all starts of a step evaluated in one batched call; run
after the family search, the affine search refines the family's optimum. The
plain distance is a least-squares sum in a handful of parameters, so each
step solves the Gauss-Newton system built from the exact derivatives of the
bilinear samples (:meth:`WarpObjective.gauss_newton`); a step is taken only
if it lowers the distance, and a descent stops once its step moves no
parameter by more than :data:`TOLERANCE` search units. The descent follows
the plain distance, the points it visits are scored with the charge, and
nothing worse than g^-1 on the calibration images is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..geometry.transforms import Transform
from .family import WarpFamily, analytic_matrix  # noqa: F401 (re-exported)
from .score import WarpObjective, charged_sq_distance, sample_many, sample_with  # noqa: F401 (re-exported)

SEARCH_KINDS = ("family", "affine")
_GRID_STEPS = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)
# A descent stops once a step moves no parameter by more than this many search units: 0.05 degrees of
# rotation or shear, 0.05% of scale, 1% of a cell of translation; 0.0005 of an affine matrix entry.
TOLERANCE = 0.01
# Maps with both sides at least twice this many cells are first searched on 2 x 2 averages.
_COARSEST = 24


@dataclass
class WarpFit:
    """A searched warp for one (layer, transform).

    ``matrix``: 3 x 3 normalized sampling matrix W (b'(q) = b(W q)).
    ``spec``: the found transform g* in the transform grammar (family) or
    ``affine[w11,w12,w13;w21,w22,w23]``. ``loss``: the searched objective for
    W on the calibration images (mean squared aligned_error, charged for
    smoothing when ``smoothing_control``; see :class:`WarpObjective`);
    ``plain_loss``: the same without the charge; ``analytic_loss``: g^-1's
    (which no charge changes).
    """

    kind: str
    matrix: np.ndarray
    spec: str
    loss: float
    analytic_loss: float
    params: dict = field(default_factory=dict)
    plain_loss: float = math.nan
    smoothing_control: bool = True


def _matrix_jacobian(to_matrices, u: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """(K, 6, P) derivatives of the top six matrix entries with respect to the (K, P) search units.

    Central differences in float64, all K x 2P evaluations in one batched call: a matrix entry is a
    smooth function of a handful of parameters of order one, so the error (step^2 times the third
    derivative, about 1e-12) is far below anything the Gauss-Newton system resolves; for the affine
    search the map is linear and the differences are exact up to rounding.
    """
    k, n_params = u.shape
    offsets = torch.eye(n_params, dtype=u.dtype, device=u.device) * step
    points = torch.cat([(u[:, None, :] + offsets).reshape(-1, n_params), (u[:, None, :] - offsets).reshape(-1, n_params)])
    entries = to_matrices(points)[:, :2].reshape(2, k, n_params, 6)
    return ((entries[0] - entries[1]) / (2 * step)).transpose(1, 2)


def _descend(objective: WarpObjective, to_matrices, starts: torch.Tensor, steps: int, tolerance: float) -> torch.Tensor:
    """Levenberg-Marquardt on the plain distance from S starts at once, in search units u; (S, P) end points.

    ``to_matrices`` maps (K, P) to (K, 3, 3) sampling matrices; the Gauss-Newton terms in the
    matrix entries (:meth:`WarpObjective.gauss_newton`) are carried to u by its Jacobian. A trial
    step is scored by its loss alone (one resampling); the derivatives (two more) are computed only
    where a step was taken and the descent goes on, from the residuals the trial already computed.
    A step is taken only where it lowers the distance. Each start takes at most ``steps`` trial
    steps and stops once a step moves no parameter by more than ``tolerance`` units (or its
    damping has grown past any useful step).
    """

    def terms(u: torch.Tensor, mismatch: torch.Tensor | None = None):
        jacobian = _matrix_jacobian(to_matrices, u)
        loss, gradient, hessian = objective.gauss_newton(to_matrices(u), mismatch)
        return loss, jacobian.transpose(1, 2) @ gradient.unsqueeze(2), jacobian.transpose(1, 2) @ hessian @ jacobian

    u = starts.clone()
    loss, gradient, hessian = terms(u)
    damping = torch.full((len(u),), 1e-3, dtype=torch.float64)
    active = torch.ones(len(u), dtype=torch.bool)
    for _ in range(steps):
        if not bool(active.any()):
            break
        rows = torch.nonzero(active).squeeze(1)
        h = hessian[rows]
        diagonal = torch.diagonal(h, dim1=1, dim2=2)
        floor = 1e-9 * diagonal.amax(dim=1, keepdim=True) + 1e-30  # keeps the system regular where a direction is flat
        system = h + torch.diag_embed(damping[rows, None] * diagonal + floor)
        step = -torch.linalg.solve(system, gradient[rows]).squeeze(2)
        trial = u[rows] + step
        trial_loss, mismatch = objective.descent_loss(to_matrices(trial), keep=True)
        accepted = torch.isfinite(trial_loss) & (trial_loss < loss[rows])
        moved_rows = rows[accepted]
        u[moved_rows], loss[moved_rows] = trial[accepted], trial_loss[accepted]
        damping[moved_rows] = (damping[moved_rows] / 10).clamp(min=1e-9)
        damping[rows[~accepted]] *= 10
        # done: a step within the tolerance (taken, or not even that helps), or no useful step left
        done = (step.abs().amax(dim=1) <= tolerance) | (~accepted & (damping[rows] > 1e8))
        active[rows[done]] = False
        going_on = accepted.clone()
        going_on[accepted] = active[moved_rows]
        refresh = rows[going_on]
        if len(refresh):  # the residuals of these points were just computed: only their derivatives are sampled
            _, gradient[refresh], hessian[refresh] = terms(u[refresh], None if mismatch is None else mismatch[:, going_on])
    return u


def search_warp(
    reference: torch.Tensor,
    moved: torch.Tensor,
    mask: torch.Tensor,
    chance: torch.Tensor,
    transform: Transform,
    stride: float = 1.0,
    kind: str = "family",
    steps: int = 60,
    starts: Sequence[np.ndarray | torch.Tensor] | None = None,
    smoothing_control: bool = True,
    start: np.ndarray | torch.Tensor | None = None,
    tolerance: float = TOLERANCE,
) -> WarpFit:
    """Search the warp aligning ``moved`` = F(g x) with ``reference`` = F(x).

    ``reference``, ``moved``: (N, C, h, w) calibration maps; ``mask``: (h, w)
    valid cells of g^-1; ``chance``: (N,) chance distances; ``stride``: the
    map's stride (pixel parameters refer to the image of size stride * map).
    ``starts``: extra starting sampling matrices (3 x 3 or 2 x 3, normalized,
    output -> input like g^-1's), e.g. a lattice-registered g^-1 or the family
    optimum for the affine search; g^-1 itself is always a start. A start
    outside g's family is projected onto it (least squares on the matrix
    entries). ``start``: one extra start (same as ``starts=[start]``).
    ``smoothing_control``: charge candidates for the smoothing of resampling
    (see :class:`WarpObjective`); ``False`` gives the plain distance.
    ``steps``: at most this many descent steps per start; a descent stops
    earlier once a step moves no parameter by more than ``tolerance``
    search units (see :data:`TOLERANCE`).
    """
    if kind not in SEARCH_KINDS:
        raise ValueError(f"kind must be one of {SEARCH_KINDS}, got {kind!r}")
    extra = list(starts or []) + ([start] if start is not None else [])
    return search_warps(reference, moved, mask, chance, transform, stride, (kind,), steps, extra,
                        smoothing_control, tolerance)[kind]


def search_warps(
    reference: torch.Tensor,
    moved: torch.Tensor,
    mask: torch.Tensor,
    chance: torch.Tensor,
    transform: Transform,
    stride: float = 1.0,
    kinds: Sequence[str] = SEARCH_KINDS,
    steps: int = 60,
    starts: Sequence[np.ndarray | torch.Tensor] | None = None,
    smoothing_control: bool = True,
    tolerance: float = TOLERANCE,
) -> dict[str, WarpFit]:
    """Several searches on the same calibration maps, sharing their set-up; ``{kind: WarpFit}``.

    Arguments as :func:`search_warp`. The objective, its coarse levels and g^-1's loss are built
    once. With both kinds, the affine search starts from the family search's optimum alone (which
    that search reached from g^-1, the extra starts and the grid, coarse to fine) and descends on
    the maps themselves; alone, it starts from g^-1 and the extra starts like the family search.
    """
    unknown = [kind for kind in kinds if kind not in SEARCH_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {SEARCH_KINDS}, got {list(kinds)!r}")
    extra = [torch.as_tensor(m, dtype=torch.float64) for m in (starts or [])]
    for m in extra:
        if tuple(m.shape) not in ((3, 3), (2, 3)):
            raise ValueError(f"a start must be a 3 x 3 or 2 x 3 sampling matrix, got shape {tuple(m.shape)}")
    height, width = reference.shape[-2:]
    family = WarpFamily(transform, int(round(height * stride)), int(round(width * stride)))
    analytic = family.normalized(family.init)
    objective = WarpObjective(reference, moved, mask, chance, analytic, transform.circular, smoothing_control)
    # Coarse to fine: on a large map, descend first on 2 x 2 averages of the maps (the same normalized frame),
    # then from there on the maps themselves, where the last steps are taken.
    levels = objective.pyramid(_COARSEST)
    with torch.no_grad():
        analytic_loss = float(objective.plain(analytic.unsqueeze(0))[0])
    fits: dict[str, WarpFit] = {}
    if "family" in kinds:
        fits["family"] = _search(objective, levels, family, analytic, analytic_loss, stride, "family", steps, extra,
                                 smoothing_control, tolerance)
    if "affine" in kinds:
        if "family" in fits:
            # The family search already descended from every start, coarse to fine; the affine search
            # frees the remaining entries from where it ended, on the maps themselves.
            start = [torch.as_tensor(fits["family"].matrix, dtype=torch.float64)]
            fits["affine"] = _search(objective, levels[-1:], family, analytic, analytic_loss, stride, "affine", steps,
                                     start, smoothing_control, tolerance, refine=True)
        else:
            fits["affine"] = _search(objective, levels, family, analytic, analytic_loss, stride, "affine", steps, extra,
                                     smoothing_control, tolerance)
    return {kind: fits[kind] for kind in kinds}


def _search(objective: WarpObjective, levels: list[WarpObjective], family: WarpFamily, analytic: torch.Tensor,
            analytic_loss: float, stride: float, kind: str, steps: int, extra: list[torch.Tensor], smoothing_control: bool,
            tolerance: float, refine: bool = False) -> WarpFit:
    """One search (see :func:`search_warp`) on a built objective and its coarse levels.

    ``refine``: descend from the ``extra`` starts alone (not from g^-1); g^-1 remains the fallback.
    """
    height, width = objective.reference.shape[-2:]
    if kind == "family":
        units = family.units(cell=stride)

        def to_matrices(u: torch.Tensor) -> torch.Tensor:
            return family.normalized(family.init + u * units)

        candidates = [(family.project(m) - family.init) / units for m in extra]
    else:
        cell = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
        units = torch.cat([torch.full((2,), 0.05, dtype=torch.float64), cell[:1], torch.full((2,), 0.05, dtype=torch.float64), cell[1:]])
        base = analytic[:2].reshape(-1)
        bottom = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)

        def to_matrices(u: torch.Tensor) -> torch.Tensor:
            top = (base + u * units).reshape(-1, 2, 3)
            return torch.cat([top, bottom.expand(top.shape[0], 1, 3)], dim=1)

        candidates = [(m[:2].reshape(-1) - base) / units for m in extra]

    origin = torch.zeros(len(units), dtype=torch.float64)
    starting = list(candidates) if refine else [origin, *candidates]
    if kind == "family":
        # A coarse grid around g^-1, scored as the result will be: on the maps themselves, with the charge
        # (whole-cell shifts, which the charge does not penalise, often win there); the scores are kept.
        with torch.no_grad():
            starting.append(_grid_best(objective, to_matrices, len(units), smoothing_control))
    starting = torch.unique(torch.stack(starting), dim=0)
    ends = starting
    for depth, level in enumerate(levels):
        # A coarse level's cells are 2^k of the map's: its descent stops at the same fraction of its own
        # cell, which the next level refines; only the last level stops at ``tolerance`` itself.
        level_tolerance = tolerance * 2 ** (len(levels) - 1 - depth)
        ends = _descend(level, to_matrices, _distinct(ends, level_tolerance), steps, level_tolerance)
    # Descent follows the plain distance (its gradient is smooth; the charge's nearest-cell term is piecewise
    # constant); the starts and the points the descents end at are then scored with the charge, in one batch
    # (g^-1's own score is its plain loss, known already).
    points = torch.unique(torch.cat([starting, ends]), dim=0)
    points = points[points.abs().amax(dim=1) > 0]
    best_u, best, plain = origin, analytic_loss, analytic_loss
    if len(points):
        with torch.no_grad():
            charged, plain_scores = (t.cpu() for t in objective.scores(to_matrices(points)))
        scores = charged if smoothing_control else plain_scores
        if float(scores.min()) < best:
            index = int(scores.argmin())
            best_u, best, plain = points[index], float(scores[index]), float(plain_scores[index])
    matrix = to_matrices(best_u.unsqueeze(0))[0].numpy()
    if kind == "family":
        values = family.init + best_u * units
        return WarpFit("family", matrix, family.spec(values), best, analytic_loss, family.params(values), plain,
                       smoothing_control)
    spec = "affine[" + ";".join(",".join(f"{v:.4g}" for v in row) for row in matrix[:2]) + "]"
    return WarpFit("affine", matrix, spec, best, analytic_loss, {"matrix": matrix[:2].tolist()}, plain, smoothing_control)


def _distinct(points: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(S, P) points less those within ``tolerance`` units (every parameter) of an earlier one.

    Starts that descended into the same point on a coarse level go on as one: the search could not
    tell them apart anyway, since a descent stops once its steps are that small.
    """
    kept: list[torch.Tensor] = []
    for point in points:
        if all(float((point - other).abs().max()) > tolerance for other in kept):
            kept.append(point)
    return torch.stack(kept)


def _grid_best(objective: WarpObjective, to_matrices, n_params: int, smoothing_control: bool) -> torch.Tensor:
    """The best point, by the charged score, of a coarse one-parameter-at-a-time grid around g^-1.

    Every point's plain distance is computed (one resampling each, in one batch); then points are
    charged in order of their plain distance until the next one's plain distance reaches the best
    charged score found, since a charge (what bilinear averaging gains over nearest-cell sampling)
    only adds to the plain distance, bar rounding and magnifying warps. Charging every point would
    cost three resamplings each.
    """
    points = []
    for i in range(n_params):
        for step in (_GRID_STEPS if i < n_params - 2 else (-1.0, 1.0)):
            u = torch.zeros(n_params, dtype=torch.float64)
            u[i] = step
            points.append(u)
    points = torch.stack(points)
    plain = objective.plain(to_matrices(points)).cpu()
    if not smoothing_control:
        return points[int(plain.argmin())]
    best, best_score = None, math.inf
    for index in torch.argsort(plain).tolist():
        if float(plain[index]) >= best_score:
            break
        score = float(objective.scores(to_matrices(points[index:index + 1]))[0][0])
        if score < best_score:
            best, best_score = index, score
    return points[best]
