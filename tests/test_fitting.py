"""Fitted alignments: the warp search, channel maps, the calibration split, explain."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alignscope
from alignscope.fit.channels import ChannelStatistic, apply_linear, apply_permutation, choose_ridge
from alignscope.errors import UsageError
from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import inverse_warp, valid_mask, warp
from alignscope.fit.search import search_warp, sample_with

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def smooth_field(n=6, c=6, size=48, seed=0):
    torch.manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, c, size + 8, size + 8), 5, 1, 2)[..., 4:-4, 4:-4]


def chance_of(a, mask):
    return ((a - a.roll(1, 0)).square() * mask).sum((1, 2, 3)).sqrt().double()


@pytest.fixture(scope="module")
def known_warp():
    """b = g_true a with g_true = rotate20 + translate3,-2, while the analytic guess is rotate30."""
    a = smooth_field()
    true = parse_transform("rotate20+translate3,-2")[0]
    mask = valid_mask(true, 48, 48, 1.0, disk=True)
    return a, warp(a, true, 1.0), mask, true


def test_family_search_recovers_a_known_warp(known_warp):
    a, b, mask, _ = known_warp
    fit = search_warp(a, b, mask, chance_of(a, mask), parse_transform("rotate30")[0], 1.0, "family")
    assert fit.params["rotate0"] == pytest.approx(20.0, abs=0.5)
    assert fit.params["translate_x_px"] == pytest.approx(3.0, abs=0.3)
    assert fit.params["translate_y_px"] == pytest.approx(-2.0, abs=0.3)
    assert fit.plain_loss < 0.1 * fit.analytic_loss
    # charged for what averaging would gain on g^-1's (large, here) mismatch: conservative, still a clear gain
    assert fit.plain_loss < fit.loss < 0.25 * fit.analytic_loss
    assert fit.spec.startswith("rotate")


def test_affine_search_recovers_a_known_matrix(known_warp):
    a, b, mask, true = known_warp
    fit = search_warp(a, b, mask, chance_of(a, mask), parse_transform("rotate30")[0], 1.0, "affine")
    np.testing.assert_allclose(fit.matrix, true.matrix(48, 48), atol=0.015)


def test_search_is_never_worse_than_the_analytic_warp():
    a = smooth_field(seed=3)
    g = parse_transform("rot90")[0]
    b = warp(a, g, 1.0)  # exact: g^-1 is already optimal
    mask = valid_mask(g, 48, 48, 1.0)
    fit = search_warp(a, b, mask, chance_of(a, mask), g, 1.0, "family", steps=20)
    assert fit.analytic_loss < 1e-12
    assert fit.loss <= fit.analytic_loss


def test_analytic_sampling_matrix_reproduces_inverse_warp():
    x = smooth_field(n=2, c=3, size=20)
    for spec, stride in (("rotate33", 1.0), ("scale0.8+translate4,0", 4.0), ("rot90", 2.0), ("roll3,-5", 2.0)):
        g = parse_transform(spec)[0]
        matrix = g.matrix(20 * int(stride), 20 * int(stride))
        torch.testing.assert_close(sample_with(x, matrix, g.circular), inverse_warp(x, g, stride), atol=1e-5, rtol=0)


def test_permutation_recovers_a_known_channel_shuffle_exactly():
    torch.manual_seed(0)
    a = torch.randn(5, 12, 9, 9)
    perm = torch.randperm(12)
    b = torch.empty_like(a)
    b[:, perm] = a  # a's channel i sits in b's channel perm[i]
    b = b + 0.05 * torch.randn_like(b)
    stat = ChannelStatistic(12)
    stat.update(a, b, torch.ones(9, 9))
    found, corr = stat.fit_permutation()
    assert torch.equal(found, perm)
    assert bool((corr > 0.95).all())
    assert (apply_permutation(b, found) - a).abs().max() < 0.5


def masked_sq_error(a, b, mask):
    return float(((a - b).double().square() * mask.double()).sum())


@pytest.mark.parametrize("seed", range(8))
def test_permutation_is_never_worse_than_the_identity_on_its_calibration_cells(seed):
    """Property: the identity is a permutation, so the fitted one cannot lose on the cells it was fitted on.

    A random conv layer under hflip (b' = g^-1 F(g x)), its channels rescaled, offset and (odd seeds)
    shuffled at random: matching on correlation (scale- and offset-blind) loses to the identity on
    some of these seeds; matching on L2 must never.
    """
    gen = torch.Generator().manual_seed(seed)
    channels = int(torch.randint(4, 17, (1,), generator=gen))
    layer = nn.Conv2d(3, channels, 3, padding=1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.bias.copy_(torch.randn(channels, generator=gen))
    x = F.avg_pool2d(torch.randn(6, 3, 20, 20, generator=gen), 3, 1, 1)
    g = parse_transform("hflip")[0]
    with torch.no_grad():
        a = layer(x)
        aligned = inverse_warp(layer(warp(x, g, 1.0)), g, 1.0)
        # odd seeds shuffle the channels; even ones keep them (where the identity is already close)
        shuffle = torch.randperm(channels, generator=gen) if seed % 2 else torch.arange(channels)
        scale = torch.exp(0.5 * torch.randn(channels, generator=gen)).reshape(1, -1, 1, 1)
        offset = torch.randn(channels, generator=gen).reshape(1, -1, 1, 1)
        aligned = aligned[:, shuffle] * scale + offset
    mask = (torch.rand(20, 20, generator=gen) > 0.2).float()
    stat = ChannelStatistic(channels)
    stat.update(a, aligned, mask)
    perm, _ = stat.fit_permutation()
    assert sorted(perm.tolist()) == list(range(channels))
    permuted = masked_sq_error(a, apply_permutation(aligned, perm), mask)
    identity = masked_sq_error(a, aligned, mask)
    assert permuted <= identity * (1 + 1e-9)
    assert stat.permuted_squared_error(perm) == pytest.approx(permuted, rel=1e-6)


def test_permutation_minimizes_l2_where_correlation_would_swap():
    """a = (u, v), b' = (u + v/2, u/100): correlation prefers the swap (1 + 0.45 > 0.89 + 0), L2 the identity
    (0.25 + 1 against 0.98 + 1.25)."""
    torch.manual_seed(0)
    u, v = torch.randn(2, 4, 1, 16, 16)
    a = torch.cat([u, v], dim=1)
    aligned = torch.cat([u + 0.5 * v, 0.01 * u], dim=1)
    stat = ChannelStatistic(2)
    stat.update(a, aligned, torch.ones(16, 16))
    corr = stat.correlation()
    assert corr[0, 1] + corr[1, 0] > corr[0, 0] + corr[1, 1]  # the case is what it claims to be
    perm, matched = stat.fit_permutation()
    assert perm.tolist() == [0, 1]
    torch.testing.assert_close(matched, torch.diagonal(corr))


def test_channel_statistic_refuses_mismatched_shapes():
    stat = ChannelStatistic(3)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        stat.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask"):
        stat.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.ones(5, 4))


def test_stem_permutation_under_hflip_is_not_worse_than_the_inverse_warp_held_out(lite0, tmp_path):
    """The default model's stem under hflip, 48 distinct crops (32 calibrate, 16 held out): the permutation
    fitted in L2 does not do worse than g^-1 alone beyond the 95% half-width on held-out images."""
    from alignscope.bench.bench import make_image_folder

    folder = make_image_folder(48, tmp_path / "crops")
    report = alignscope.analyze("tf_efficientnet_lite0", transforms=["hflip"], layers=["conv_stem"], images=str(folder),
                                channel_map="permutation", calibration_images=32)
    row = report.table.iloc[0]
    assert row["n_calibration"] == 32 and row["n_images"] == 16
    half_width = row["aligned_error_ci_high"] - row["aligned_error"]
    assert row["permuted_error"] <= row["aligned_error"] + half_width


def test_linear_map_recovers_a_mixing_and_cross_validation_prefers_small_ridge():
    torch.manual_seed(0)
    a = torch.randn(8, 6, 10, 10)
    mixing = torch.randn(6, 6) + 3 * torch.eye(6)
    b = apply_linear(a, torch.linalg.inv(mixing))
    halves = [ChannelStatistic(6), ChannelStatistic(6)]
    for i, half in enumerate(halves):
        half.update(a[i::2], b[i::2], torch.ones(10, 10))
    ridge, scores = choose_ridge(*halves)
    assert ridge == min(scores)  # noise-free: the least regularization wins
    merged = ChannelStatistic(6).merge(halves[0]).merge(halves[1])
    torch.testing.assert_close(merged.fit_linear(1e-8), mixing.double(), atol=1e-3, rtol=0)
    assert merged.squared_error(merged.fit_linear(1e-8)) < 1e-6 * float(merged.sq_a.sum())
    # a huge ridge means "no re-mixing": the map shrinks to the identity, not to zero
    torch.testing.assert_close(merged.fit_linear(1e9), torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [6, 120])
def test_cross_validated_ridge_scores_are_those_of_the_fitted_maps(channels):
    """choose_ridge's scores (computed in the Gram matrix's eigenbasis) equal fitting on one half and scoring the
    other with fit_linear and squared_error, also with more channels than cells (a singular Gram matrix)."""
    torch.manual_seed(1)
    a = torch.randn(4, channels, 7, 7)
    b = 0.5 * a.roll(1, dims=1) + torch.randn(4, channels, 7, 7)
    halves = [ChannelStatistic(channels), ChannelStatistic(channels)]
    for i, half in enumerate(halves):
        half.update(a[i::2], b[i::2], torch.ones(7, 7))
    ridge, scores = choose_ridge(*halves)
    first, second = halves
    total = float(first.sq_a.sum() + second.sq_a.sum())
    for candidate, score in scores.items():
        direct = (second.squared_error(first.fit_linear(candidate)) + first.squared_error(second.fit_linear(candidate))) / total
        assert score == pytest.approx(direct, rel=1e-9)
    assert scores[ridge] == min(scores.values())


class Marker(nn.Module):
    """A 1x1 identity convolution: the map is the image, so each image's marker value is visible in its maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))

    def forward(self, x):
        return self.conv(x)


def test_fits_see_only_the_calibration_images(monkeypatch):
    from alignscope.fit import fitting

    torch.manual_seed(0)
    images = torch.randn(10, 3, 16, 16)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.float32)  # image k carries the marker k
    seen = []
    original = fitting.Calibrator.update

    def spy(self, pair):
        seen.extend(pair.reference[:, 0, 0, 0].round().int().tolist())
        original(self, pair)

    monkeypatch.setattr(fitting.Calibrator, "update", spy)
    report = alignscope.analyze(Marker(), transforms=["hflip"], images=images, input_size=(3, 16, 16), mean=MEAN,
                                std=STD, batch_size=3, channel_map="linear", calibration_images=4)
    assert set(seen) == {0, 1, 2, 3}
    assert report.meta["fits"]["calibration_images"] == [f"tensor[{i}]" for i in range(4)]
    assert report.meta["images_used"] == [f"tensor[{i}]" for i in range(4, 10)]
    assert int(report.table["n_images"].iloc[0]) == 6


def test_fitted_alignments_refuse_too_few_images(photo_tensor):
    with pytest.raises(UsageError, match="at least 8 images"):
        alignscope.analyze(Marker(), transforms=["rot90"], images=photo_tensor[:7], input_size=(3, 64, 64),
                           optimal="family")
    with pytest.raises(UsageError, match="optimal must be one of"):
        alignscope.analyze(Marker(), transforms=["rot90"], images=photo_tensor, input_size=(3, 64, 64), optimal="best")


def test_unknown_fit_choice_and_bad_ridge_are_usage_errors(photo_tensor):
    with pytest.raises(UsageError, match="channel_map must be one of"):
        alignscope.analyze(Marker(), images=photo_tensor, input_size=(3, 64, 64), channel_map="cca")
    with pytest.raises(UsageError, match="ridge"):
        alignscope.analyze(Marker(), images=photo_tensor, input_size=(3, 64, 64), channel_map="linear", ridge=-1.0)


@pytest.fixture(scope="module")
def theorem_tables():
    """The three e2cnn validation cases on the bundled photos at 64 x 64 under rot90."""
    pytest.importorskip("e2cnn")
    from alignscope.inputs.images import image_stream
    from alignscope.model.build import DataConfig
    from alignscope.model.reference_nets import C8Network, PlainNetwork

    cfg = DataConfig(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear")
    photos = torch.cat([b.pixels for b in image_stream(None, cfg, batch_size=8)])
    tables = {}
    for name, net in (("c8", C8Network()), ("plain", PlainNetwork())):
        report = alignscope.analyze(net, transforms=["rot90"], layers=["regular", "pooled"], images=photos,
                                    input_size=(3, 64, 64), mean=MEAN, std=STD, batch_size=4, channel_map="permutation")
        tables[name] = report.table.set_index("layer")
    return tables


def test_c8_group_pooled_fields_align_with_the_inverse_warp(theorem_tables):
    assert theorem_tables["c8"].loc["pooled", "aligned_error"] < 1e-4
    assert theorem_tables["c8"].loc["pooled", "unaligned_error"] > 0.3


def test_c8_regular_fields_need_the_cyclic_channel_shift(theorem_tables):
    row = theorem_tables["c8"].loc["regular"]
    assert row["aligned_error"] > 0.3
    assert row["permuted_error"] < 1e-4
    assert row["permuted_channels"] == 32  # every channel moves: a shift by two within each field of 8


def test_plain_cnn_aligns_neither_way(theorem_tables):
    for layer in ("regular", "pooled"):
        row = theorem_tables["plain"].loc[layer]
        assert row["aligned_error"] > 0.3
        assert row["permuted_error"] > 0.3


def test_c8_permutation_is_the_cyclic_shift():
    pytest.importorskip("e2cnn")
    from alignscope.model.reference_nets import C8Network

    torch.manual_seed(0)
    images = F.avg_pool2d(torch.randn(8, 3, 40, 40), 3, 1, 1)
    report = alignscope.analyze(C8Network(fields=2), transforms=["rot90"], layers=["regular"], images=images,
                                input_size=(3, 40, 40), batch_size=4, channel_map="permutation")
    perm = report.permutation("regular", "rot90")
    shifts = {(perm[i] - i) % 8 for i in range(16)}
    fields = {perm[i] // 8 == i // 8 for i in range(16)}
    assert len(shifts) == 1 and shifts != {0} and fields == {True}


def test_analyze_with_fits_on_the_pretrained_model(lite0, tmp_path):
    report = alignscope.analyze("tf_efficientnet_lite0", transforms=["translate32,0", "rot90"], layers=["blocks.1", "blocks.4"],
                                input_size=(3, 96, 96), optimal="family", channel_map=["linear", "permutation"],
                                search_steps=15)
    table = report.table.set_index(["layer", "transform"])
    for column in ("optimal_error", "channel_mapped_error", "permuted_error", "optimal_transform", "n_calibration"):
        assert column in table.columns
    assert (table["n_calibration"] == 4).all() and (table["n_images"] == 4).all()
    # A translation by the deepest stride is already aligned by g^-1; the search stays near it.
    found = table.loc[("blocks.4", "translate32,0"), "optimal_transform"]
    assert found.startswith("translate")
    assert abs(float(found[len("translate"):].split(",")[0]) - 32) < 8
    out = report.save(tmp_path / "r")
    fits = json.loads((out / "fits.json").read_text())
    assert "permutation" in fits["blocks.1|rot90"] and "family" in fits["blocks.1|rot90"]
    assert (out / "alignment_by_depth_fitted.png").is_file()
    assert math.isfinite(float(table.loc[("blocks.1", "rot90"), "permuted_error"]))


def test_explain_finds_the_channel_carrying_a_known_swap(tmp_path):
    """hflip with a network whose channels 0 and 1 swap roles under a flip: explain matches them."""

    class Swapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, (1, 3), padding=(0, 1), bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[0, 0, 0] = torch.tensor([1.0, 0.0, -1.0])  # d/dx
                self.conv.weight[1, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])  # -d/dx: channel 0 of a flipped image
                self.conv.weight[2, 1, 0] = torch.tensor([0.0, 1.0, 0.0])  # flip-invariant

        def forward(self, x):
            return self.conv(x)

    from alignscope.explain import explain

    torch.manual_seed(0)
    images = F.avg_pool2d(torch.randn(6, 3, 24, 24), 3, 1, 1)
    result = explain(Swapper(), layer="conv", transform="hflip", images=images, input_size=(3, 24, 24), batch_size=3)
    table = result.table.set_index("channel")
    assert list(table["match"]) == [1, 0, 2]
    assert table.loc[0, "aligned_error"] > 0.5 and table.loc[0, "matched_error"] < 0.05
    assert table.loc[2, "aligned_error"] < 1e-5
    out = result.save(tmp_path / "explain", top=1)
    assert (out / "channels.png").is_file() and (out / "channels.csv").is_file()


def cli(*args):
    from alignscope.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def test_cli_fits_and_explain(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "fitted"
    assert cli("analyze", "--transform", "rot90", "--layers", "blocks.2", "--optimal", "family", "--channel-map",
               "permutation", "--search-steps", "5", "--no-plots", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "permuted_error" in text and "4 more calibrated the fits" in text
    table = pd.read_csv(out / "alignment.csv")
    assert {"optimal_error", "permuted_error", "optimal_transform"} <= set(table.columns)
    assert cli("analyze", "--transform", "rot90", "--optimal", "family", "--max-images", "6", "--out", str(tmp_path / "few")) == 2
    assert "at least 8 images" in capsys.readouterr().err
    assert cli("analyze", "--channel-map", "linear", "--ridge", "lots", "--out", str(tmp_path / "r")) == 2
    assert cli("explain", "--layer", "blocks.1", "--transform", "rot90", "--top", "2", "--out", str(tmp_path / "ex")) == 0
    assert "after the best channel permutation" in capsys.readouterr().out
    assert (tmp_path / "ex" / "channels.png").is_file()
    assert cli("explain", "--layer", "blocks.*", "--out", str(tmp_path / "ex2")) == 2
    assert "explain takes one layer" in capsys.readouterr().err
