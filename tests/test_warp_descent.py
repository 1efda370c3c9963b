"""The warp search's descent: exact Gauss-Newton terms, known warps found to within the tolerance, early stop.

Known answers by construction: b is a smooth field moved by a known warp (pure translation by a
fraction of a cell, a rotation with a shift, a general affine map); the search starts from another
warp and must return the true one to within its tolerance. The Gauss-Newton terms are checked
against autograd through ``grid_sample`` on random maps and matrices.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import valid_mask, warp
from alignscope.fit.score import WarpObjective, sample_many, sample_with_gradient
from alignscope.fit.search import TOLERANCE, analytic_matrix, search_warp


def smooth_field(n=4, c=5, height=40, width=48, seed=0):
    torch.manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, c, height + 8, width + 8), 5, 1, 2)[..., 4:-4, 4:-4]


def chance_of(a, mask):
    return ((a - a.roll(1, 0)).square() * mask).sum((1, 2, 3)).sqrt().double()


def random_matrices(k, seed):
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(k, generator=gen, dtype=torch.float64) - 0.5
    scale = 0.8 + 0.4 * torch.rand(k, generator=gen, dtype=torch.float64)
    m = torch.zeros(k, 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = scale * torch.cos(angle), torch.sin(angle) + 0.1
    m[:, 1, 0], m[:, 1, 1] = -torch.sin(angle), scale * torch.cos(angle)
    m[:, :2, 2] = 0.3 * (torch.rand(k, 2, generator=gen, dtype=torch.float64) - 0.5)
    m[:, 2, 2] = 1
    return m


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("size", [(6, 10), (7, 5)])
def test_sampled_derivatives_are_those_of_the_bilinear_interpolant(circular, size):
    """d out / d W from sample_with_gradient equals autograd's through grid_sample (non-square maps)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    matrices = random_matrices(4, seed=1)
    weights = torch.randn(2, 3, 4, *size, dtype=torch.float64)
    theta = matrices.clone().requires_grad_(True)
    (sample_many(x, theta, circular) * weights).sum().backward()
    values, d_x, d_y = sample_with_gradient(x, matrices, circular)
    torch.testing.assert_close(values, sample_many(x, matrices, circular))
    h, w = size
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    qy, qx = torch.meshgrid(ys, xs, indexing="ij")
    q = torch.stack([qx, qy, torch.ones_like(qx)])  # (3, h, w)
    expected = torch.stack([torch.einsum("nckhw,jhw->kj", weights * d, q) for d in (d_x, d_y)], dim=1)  # (K, 2, 3)
    torch.testing.assert_close(expected, theta.grad[:, :2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("channels, height, width", [(2, 9, 11), (40, 4, 5)])
def test_gauss_newton_terms_match_autograd(circular, channels, height, width):
    """Loss as plain(); gradient = autograd's; hessian = 2 J^T J with J the weighted residuals' Jacobian.

    The second shape has more (image, channel) rows (120) than twice its cells (40): the descent's
    terms come from the QR-reduced rows there, and must still be those of every image and channel.
    """
    a = smooth_field(n=3, c=channels, height=height, width=width)
    b = smooth_field(n=3, c=channels, height=height, width=width, seed=1)
    g = parse_transform("rotate10")[0]
    mask = valid_mask(g, height, width, 1.0)
    chance = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    objective = WarpObjective(a, b, mask, chance, torch.as_tensor(analytic_matrix(g, height, width)), circular,
                              dtype=torch.float64)
    matrices = random_matrices(3, seed=2)
    loss, gradient, hessian = objective.gauss_newton(matrices)
    assert objective._weighted_maps[0].shape[1] == (2 * height * width if 3 * channels > 2 * height * width else channels)
    torch.testing.assert_close(loss, objective.plain(matrices))
    torch.testing.assert_close(objective.descent_loss(matrices), loss, rtol=0, atol=0)
    # the descent hands the trial's residuals on: only the derivatives are sampled again, with the same terms
    kept_loss, mismatch = objective.descent_loss(matrices, keep=True)
    for reused, fresh in zip(objective.gauss_newton(matrices, mismatch), (loss, gradient, hessian)):
        torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
    for k in range(3):
        top = matrices[k, :2].reshape(6).clone().requires_grad_(True)

        def residuals(entries):
            m = torch.cat([entries.reshape(2, 3), matrices[k, 2:]]).unsqueeze(0)
            r = a.double().unsqueeze(2) - sample_many(b.double(), m, circular)
            return (r * mask * (objective.inv_chance_sq / 3).sqrt()[:, None, None, None, None]).reshape(-1)

        jacobian = torch.autograd.functional.jacobian(residuals, top, vectorize=True)
        torch.testing.assert_close(gradient[k], 2 * jacobian.T @ residuals(top.detach()), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(hessian[k], 2 * jacobian.T @ jacobian, rtol=1e-8, atol=1e-10)


def known_case(true_spec, stride=1, height=40, width=48):
    """b = g a for a smooth field a of the given stride (a translation by 3 px is 1.5 cells at stride 2),
    and the sampling matrix that undoes g exactly (b'(q) = b(G q), G = g's normalized matrix)."""
    a = smooth_field(height=height, width=width)
    true = parse_transform(true_spec)[0]
    b = warp(a, true, float(stride))
    mask = valid_mask(true, height, width, float(stride), disk=true.has_rotation_or_shear)
    return a, b, mask, chance_of(a, mask), true.matrix(height * stride, width * stride)


def cell_displacement(first, second, height, width):
    """Largest distance in cells between where two sampling matrices take a cell from (over the whole map)."""
    corners = np.array([[-1, -1, 1, 1], [-1, 1, -1, 1], [1, 1, 1, 1]], dtype=float)
    d = (np.asarray(first)[:2] - np.asarray(second)[:2]) @ corners
    return float(np.max(np.hypot(d[0] * width / 2, d[1] * height / 2)))


@pytest.mark.parametrize("true_spec, guess_spec, stride, within", [
    # whole cells from half a cell away: b is a itself moved, the truth's distance is 0 and nothing else's is
    ("translate4,-2", "translate3,-1", 2, 0.01),
    # a fraction of a cell (1.5, -0.5 cells), a rotation with a shift: b is a interpolated, and interpolating it
    # back smooths it once more, so the distance's optimum sits near the truth, not on it
    ("translate3,-1", "identity", 2, 0.1),
    ("translate-5,3", "translate-6,2", 2, 0.1),
    ("rotate20+translate3,-2", "rotate30", 1, 0.1),
    ("rotate-8", "rotate-12", 1, 0.1),
])
@pytest.mark.parametrize("kind", ["family", "affine"])
def test_search_finds_a_known_warp(true_spec, guess_spec, stride, within, kind):
    a, b, mask, chance, exact = known_case(true_spec, stride)
    guess = parse_transform(guess_spec)[0]
    fit = search_warp(a, b, mask, chance, guess, float(stride), kind, smoothing_control=False)
    assert cell_displacement(fit.matrix, exact, 40, 48) < within
    objective = WarpObjective(a, b, mask, chance, torch.as_tensor(fit.matrix), smoothing_control=False)
    at_truth = float(objective.plain(torch.as_tensor(exact).unsqueeze(0))[0])
    assert fit.plain_loss <= at_truth * (1 + 1e-3) + 1e-9 * fit.analytic_loss  # converged, not stopped short
    assert fit.plain_loss < fit.analytic_loss


def test_charged_search_keeps_an_exact_inverse():
    """rot90 of a smooth field: g^-1 is exact (loss 0), nothing can beat it, and the search returns it."""
    a = smooth_field(height=32, width=32)
    g = parse_transform("rot90")[0]
    b = warp(a, g, 1.0)
    mask = valid_mask(g, 32, 32, 1.0)
    for kind in ("family", "affine"):
        fit = search_warp(a, b, mask, chance_of(a, mask), g, 1.0, kind)
        np.testing.assert_allclose(fit.matrix, analytic_matrix(g, 32, 32), atol=0)
        assert fit.loss == fit.analytic_loss < 1e-12


def test_descent_stops_at_the_tolerance_not_the_step_budget(monkeypatch):
    """A fractional translation from the identity: found in a handful of steps, far fewer than the budget."""
    calls = []
    original = WarpObjective.gauss_newton

    def counted(self, matrices, *rest):
        calls.append(len(matrices))
        return original(self, matrices, *rest)

    monkeypatch.setattr(WarpObjective, "gauss_newton", counted)
    a, b, mask, chance, exact = known_case("translate3,-1", stride=2)
    fit = search_warp(a, b, mask, chance, parse_transform("identity")[0], 2.0, "family", steps=200,
                      smoothing_control=False)
    assert cell_displacement(fit.matrix, exact, 40, 48) < 0.1
    assert len(calls) < 30
    calls.clear()
    search_warp(a, b, mask, chance, parse_transform("identity")[0], 2.0, "family", steps=3, smoothing_control=False)
    assert len(calls) <= 4  # the starts, then at most one batched call per step: the budget caps it
    assert TOLERANCE > 0


def test_pyramid_levels_keep_the_frame_and_the_valid_cells():
    torch.manual_seed(0)
    mask = torch.ones(112, 112)
    mask[:, :3] = 0  # columns 0-2 invalid: coarse column 0 (cells 0, 1) and 1 (cells 2, 3) are invalid at 56
    g = parse_transform("identity")[0]
    objective = WarpObjective(torch.randn(2, 3, 112, 112), torch.randn(2, 3, 112, 112), mask,
                              torch.ones(2, dtype=torch.float64), torch.as_tensor(analytic_matrix(g, 112, 112)))
    levels = objective.pyramid(24)
    assert [tuple(level.reference.shape[-2:]) for level in levels] == [(28, 28), (56, 56), (112, 112)]
    assert levels[-1] is objective and not any(level.smoothing_control for level in levels[:-1])
    assert levels[1].mask[:, :2].sum() == 0 and bool((levels[1].mask[:, 2:] == 1).all())
    torch.testing.assert_close(levels[1].reference, F.avg_pool2d(objective.reference, 2))
    odd = WarpObjective(torch.randn(1, 1, 57, 56), torch.randn(1, 1, 57, 56), torch.ones(57, 56),
                        torch.ones(1, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    assert odd.pyramid(24) == [odd]
    # a whole-cell translation of a smooth field: the same matrix aligns it on every level
    a = smooth_field(n=2, c=3, height=96, width=96)
    b = torch.roll(a, shifts=(0, 4), dims=(2, 3))
    shift = torch.eye(3, dtype=torch.float64)
    shift[0, 2] = 2 * 4 / 96  # b[j + 4] = a[j]: b'(q) = b(q + 4 cells)
    valid = torch.ones(96, 96)
    valid[:, 92:] = 0  # where q + 4 cells leaves the map
    objective = WarpObjective(a, b, valid, torch.ones(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    for level in objective.pyramid(24):
        assert float(level.plain(shift.unsqueeze(0))[0]) < 1e-8 * float(level.plain(torch.eye(3, dtype=torch.float64)[None])[0])


@pytest.mark.parametrize("kind", ["family", "affine"])
def test_coarse_to_fine_search_finds_a_known_warp_on_a_large_map(kind):
    """A 96 x 96 map is searched on 24 x 24 and 48 x 48 averages first; the last steps are on the map itself."""
    a = smooth_field(n=3, c=4, height=96, width=96)
    true = parse_transform("rotate-6+translate5,-3")[0]
    b = warp(a, true, 2.0)  # stride 2: 2.5 and -1.5 cells
    mask = valid_mask(true, 96, 96, 2.0, disk=True)
    exact = true.matrix(192, 192)
    fit = search_warp(a, b, mask, chance_of(a, mask), parse_transform("rotate-10")[0], 2.0, kind, smoothing_control=False)
    assert cell_displacement(fit.matrix, exact, 96, 96) < 0.1
    objective = WarpObjective(a, b, mask, chance_of(a, mask), torch.as_tensor(fit.matrix), smoothing_control=False)
    assert fit.plain_loss <= float(objective.plain(torch.as_tensor(exact).unsqueeze(0))[0]) * (1 + 1e-3)
