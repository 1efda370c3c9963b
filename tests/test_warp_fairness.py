"""The warp search cannot win by blurring: candidates are charged for the averaging of resampling.

Known answer: a stride-1 CNN of random 5 x 5 filters on odd-sized (65 x 65) inputs has a centred
lattice, so g^-1 is geometrically exact for rot90 and hflip; no other warp can be *better aligned*,
only smoother. The plain L2 search reports a gain there anyway (bilinear sampling at a fractional
offset low-passes b'); the charged search, the default, does not.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alignscope
from alignscope.measure.metrics import AlignmentStatistic
from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import valid_mask, warp
from alignscope.fit.search import (WarpObjective, analytic_matrix, charged_sq_distance, sample_many, sample_with,
                                   search_warp)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 65


def random_filter_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv2d(16, 16, 5, padding=2), nn.ReLU()).eval()


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """16 distinct natural crops (the benchmark's), prepared at 65 x 65."""
    from alignscope.bench.bench import make_image_folder
    from alignscope.inputs.images import image_stream
    from alignscope.model.build import DataConfig

    folder = make_image_folder(16, tmp_path_factory.mktemp("crops"))
    cfg = DataConfig(input_size=(3, SIZE, SIZE), crop_pct=1.0, interpolation="bilinear")
    return torch.cat([b.pixels for b in image_stream(str(folder), cfg, batch_size=16)])


def calibration_maps(net, images, spec):
    g = parse_transform(spec)[0]
    with torch.no_grad():
        a, b = net(images), net(warp(images, g, 1.0))
    mask = valid_mask(g, SIZE, SIZE, 1.0, disk=g.has_rotation_or_shear)
    chance = ((a - a.roll(1, 0)).square() * mask).sum((1, 2, 3)).sqrt().double()
    return a, b, mask, chance, g


@pytest.fixture(scope="module")
def held_out_table(crops):
    report = alignscope.analyze(random_filter_cnn(), transforms=["rot90", "hflip"], layers=["3"], images=crops, input_size=(3, SIZE, SIZE),
                                mean=MEAN, std=STD, batch_size=8, optimal="family", calibration_images=8, search_steps=30)
    return report.table.set_index("transform")


@pytest.mark.parametrize("spec", ["rot90", "hflip"])
def test_searched_warp_is_within_noise_of_the_exact_inverse(held_out_table, spec):
    row = held_out_table.loc[spec]
    half_width = row["aligned_error_ci_high"] - row["aligned_error"]
    assert row["n_images"] == 8 and row["aligned_error"] > 0.3  # the features do not align: there is a mismatch to blur
    assert abs(row["optimal_error"] - row["aligned_error"]) <= half_width
    # g's own angle and flip: the search did not trade the rotation for smoothing
    found = row["optimal_transform"]
    if spec == "rot90":
        angle = float(found.split("+")[0][len("rotate"):])
        assert angle == pytest.approx(90.0, abs=0.5)
    else:
        assert found.split("+")[0] == "hflip"


def test_plain_search_would_win_by_blurring(crops):
    """The same maps with the charge switched off: the plain distance rewards a fractional shift well beyond
    what the charged search finds (so the test above bites)."""
    a, b, mask, chance, g = calibration_maps(random_filter_cnn(), crops[:8], "rot90")
    plain = search_warp(a, b, mask, chance, g, 1.0, "family", steps=30, smoothing_control=False)
    charged = search_warp(a, b, mask, chance, g, 1.0, "family", steps=30)
    assert plain.loss < 0.9 * plain.analytic_loss
    assert charged.loss > 0.95 * charged.analytic_loss
    shift = (plain.params["translate_x_px"] % 1, plain.params["translate_y_px"] % 1)
    assert any(0.2 < s < 0.8 for s in shift)  # the plain optimum sits between cells


def test_charge_is_zero_at_the_inverse_warp_and_counts_averaging_elsewhere():
    """At g^-1 the charged and plain distances agree; at a half-cell shift of a smooth field with unrelated
    white noise, averaging removes most of the noise, and the charge puts it back: g^-1's distance again."""
    torch.manual_seed(0)
    a = F.avg_pool2d(torch.randn(4, 3, 32, 32), 9, 1, 0)  # smooth, 24 x 24
    b = a + 0.3 * torch.randn_like(a)  # identity transform, unrelated fine-grained mismatch
    g = parse_transform("identity")[0]
    mask = valid_mask(parse_transform("translate1,1")[0], 24, 24)  # cells valid under the shifts below
    analytic = analytic_matrix(g, 24, 24)
    plain_at_g = ((a - b).square() * mask).sum((1, 2, 3), dtype=torch.float64)
    torch.testing.assert_close(charged_sq_distance(a, b, b, mask, analytic, analytic), plain_at_g, rtol=1e-6, atol=0)
    half = analytic.copy()
    half[:2, 2] = [1.0 / 24, 1.0 / 24]  # half a cell right and down
    plain_half = ((a - sample_with(b, half)).square() * mask).sum((1, 2, 3), dtype=torch.float64)
    assert bool((plain_half < 0.8 * plain_at_g).all())  # averaging four cells removes much of the noise
    charged = charged_sq_distance(a, b, b, mask, half, analytic)
    # the nearest-cell energy is that of neighbouring cells of the same noise: equal in expectation
    assert float(charged.sum()) == pytest.approx(float(plain_at_g.sum()), rel=0.05)
    assert bool((charged > 0.9 * plain_at_g).all())


def test_batched_objective_equals_one_candidate_at_a_time():
    torch.manual_seed(1)
    a, b = torch.randn(3, 4, 20, 30), torch.randn(3, 4, 20, 30)
    g = parse_transform("rotate10")[0]
    mask = valid_mask(g, 20, 30, 1.0)
    chance = torch.rand(3, dtype=torch.float64) + 1
    analytic = torch.as_tensor(analytic_matrix(g, 20, 30))
    shifts = torch.tensor([[0.0, 0.0], [0.03, -0.02], [-0.1, 0.05], [0.2, 0.2], [0.01, 0.3]], dtype=torch.float64)
    matrices = analytic.repeat(len(shifts), 1, 1)
    matrices[:, :2, 2] += shifts
    for circular in (False, True):
        objective = WarpObjective(a, b, mask, chance, analytic, circular, budget=2 * 4 * 20 * 30 * 3)  # chunks of 2
        batched = objective.plain(matrices)
        one_by_one = torch.stack([((a - sample_with(b, m, circular)).square() * mask).sum((1, 2, 3), dtype=torch.float64)
                                  for m in matrices], dim=1)
        torch.testing.assert_close(batched, (one_by_one / chance[:, None].square()).mean(0), rtol=1e-6, atol=0)
        many = sample_many(b, matrices, circular)
        for k, m in enumerate(matrices):
            torch.testing.assert_close(many[:, :, k], sample_with(b, m, circular), rtol=0, atol=1e-6)


def test_starts_are_taken_and_projected_onto_the_family():
    """With no descent steps, the search can only pick among its starts: a start at the true warp wins."""
    torch.manual_seed(0)
    a = F.avg_pool2d(torch.randn(4, 3, 56, 56), 5, 1, 2)[..., 4:-4, 4:-4]
    true = parse_transform("rotate20+translate3,-2")[0]
    b = warp(a, true, 1.0)
    mask = valid_mask(true, 48, 48, 1.0, disk=True)
    chance = ((a - a.roll(1, 0)).square() * mask).sum((1, 2, 3)).sqrt().double()
    guess = parse_transform("rotate30")[0]
    exact = true.matrix(48, 48)  # b'(q) = b(G q) with G = g's matrix: the sampling matrix that undoes g
    for kind in ("family", "affine"):
        fit = search_warp(a, b, mask, chance, guess, 1.0, kind, steps=0, starts=[exact, np.eye(3)])
        np.testing.assert_allclose(fit.matrix, exact, atol=1e-6)
        assert fit.plain_loss < 0.1 * fit.analytic_loss
    fit = search_warp(a, b, mask, chance, guess, 1.0, "family", steps=0, starts=[exact])
    assert fit.params["rotate0"] == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="sampling matrix"):
        search_warp(a, b, mask, chance, guess, 1.0, "family", starts=[np.eye(4)])
