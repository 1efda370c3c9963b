"""Networks whose alignment is known by construction, measured through analyze()."""
import math

import pytest
import torch
from torch import nn

import alignscope

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run(net, transforms, images, layers=None, **kw):
    torch.manual_seed(0)
    return alignscope.analyze(net.eval(), transforms=transforms, images=images, layers=layers,
                              input_size=tuple(images.shape[1:]), mean=MEAN, std=STD, batch_size=4, **kw).table


def circular_net(stride=1):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
    )


class FixedConv(nn.Module):
    """Every output channel applies ``kernel`` to the channel mean (zero padding)."""

    def __init__(self, kernel, channels=4):
        super().__init__()
        k = torch.as_tensor(kernel, dtype=torch.float32)
        self.conv = nn.Conv2d(3, channels, k.shape[-1], padding=k.shape[-1] // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(k.expand(channels, 3, *k.shape) / 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_identity_gives_exactly_zero(photo_tensor):
    table = run(circular_net(), ["identity"], photo_tensor, layers=["1", "3"])
    for column in ("aligned_error", "unaligned_error", "floor_error"):
        assert (table[column] == 0).all(), column
    assert (table["aligned_cosine"] > 1 - 1e-6).all()


def test_circular_conv_and_roll_align_exactly(photo_tensor):
    table = run(circular_net(), ["roll24,16"], photo_tensor, layers=["1", "3"])
    assert (table["exact"]).all()
    assert (table["aligned_error"] < 1e-5).all(), table["aligned_error"]
    assert (table["unaligned_error"] > 0.5).all(), table["unaligned_error"]


def test_strided_circular_conv_aligns_for_stride_multiple_shift(photo_tensor):
    table = run(circular_net(stride=2), ["roll4,-6", "roll3,0"], photo_tensor, layers=["1", "3"])
    multiple = table[table["transform"] == "roll4,-6"]
    assert (multiple["stride"] == 2).all()
    assert (multiple["aligned_error"] < 1e-5).all()
    # a 3-pixel roll is 1.5 cells: interpolation cannot make it exact
    odd = table[table["transform"] == "roll3,0"]
    assert (odd["aligned_error"] > 1e-3).all()
    assert not odd["exact"].any()


def test_isotropic_filter_aligns_under_rot90_but_oriented_filter_does_not(photo_tensor):
    gaussian = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    derivative = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    iso = run(FixedConv(gaussian), ["rot90", "rot270"], photo_tensor, layers=["act"])
    oriented = run(FixedConv(derivative), ["rot90"], photo_tensor, layers=["act"])
    assert (iso["aligned_error"] < 1e-5).all(), iso["aligned_error"]
    assert (iso["unaligned_error"] > 0.5).all()
    assert (oriented["aligned_error"] > 0.5).all(), oriented["aligned_error"]


def test_translation_by_stride_multiple_with_zero_fill_aligns_inside_valid_mask(photo_tensor):
    # a 1x1 conv has no spatial extent: zero-fill translation is exact inside the valid mask
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.AvgPool2d(2))
    table = run(net, ["translate8,-4"], photo_tensor, layers=["2"])
    assert table["aligned_error"].iloc[0] < 1e-5
    assert table["valid_fraction"].iloc[0] == pytest.approx((32 - 4) * (32 - 2) / 32**2)


def test_floor_is_zero_for_exact_and_positive_for_resampled_transforms(photo_tensor):
    table = run(FixedConv(torch.ones(3, 3) / 9), ["rot90", "rotate30"], photo_tensor, layers=["act"])
    assert table.set_index("transform").loc["rot90", "floor_error"] == 0
    assert table.set_index("transform").loc["rotate30", "floor_error"] > 0
    assert (table.set_index("transform").loc["rotate30", "mask"]) == "disk"


def test_statistics_match_per_image_values(photo_tensor):
    from scipy import stats

    report = alignscope.analyze(FixedConv(torch.eye(3)), transforms=["rotate20"], images=photo_tensor, layers=["act"],
                                input_size=(3, 64, 64), mean=MEAN, std=STD, batch_size=3, per_image=True)
    values = report.per_image["aligned_error"].to_numpy()
    row = report.table.iloc[0]
    assert len(values) == len(photo_tensor) == row["n_images"]
    assert row["aligned_error"] == pytest.approx(values.mean(), rel=1e-12)
    assert row["aligned_error_std"] == pytest.approx(values.std(ddof=1), rel=1e-9)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert row["aligned_error_ci_low"] == pytest.approx(low, rel=1e-4)
    assert row["aligned_error_ci_high"] == pytest.approx(high, rel=1e-4)
    # chance pairs each image with a different one, and aligned/chance is what the table reports
    per = report.per_image
    assert (per["chance_distance"] > 0).all()
    assert per["aligned_error"].to_numpy() == pytest.approx((per["aligned"] / per["chance_distance"]).to_numpy())


def test_t_quantile_matches_scipy():
    from scipy import stats

    from alignscope.measure.metrics import t_quantile_975

    for dof in (1, 2, 3, 5, 7, 10, 30, 200):
        assert t_quantile_975(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=2e-3)


def test_results_do_not_depend_on_batch_size_except_chance_pairing(photo_tensor):
    net = circular_net()
    a = run(net, ["rotate30"], photo_tensor, layers=["3"], per_image=False)
    b = alignscope.analyze(net, transforms=["rotate30"], images=photo_tensor, layers=["3"], input_size=(3, 64, 64),
                           mean=MEAN, std=STD, batch_size=8, per_image=True).per_image
    # the aligned distance itself (not divided by chance) is independent of batching
    c = alignscope.analyze(net, transforms=["rotate30"], images=photo_tensor, layers=["3"], input_size=(3, 64, 64),
                           mean=MEAN, std=STD, batch_size=3, per_image=True).per_image
    assert b["aligned"].to_numpy() == pytest.approx(c["aligned"].to_numpy(), rel=1e-4)
    assert not math.isnan(a["aligned_error"].iloc[0])


def test_identical_partner_images_are_left_out_and_reported(photo_tensor, caplog):
    doubled = photo_tensor[:2].repeat_interleave(2, dim=0)  # a, a, b, b in one batch of 4
    table = run(circular_net(), ["rot90"], doubled, layers=["3"])
    # partners (image i-1 of the whole order, the first with the second): a, a, a, b ->
    # both a's and the second b meet their copies; only the first b counts
    assert table["n_images"].iloc[0] == 1
    assert any("equal to their chance partner" in r.message for r in caplog.records)
