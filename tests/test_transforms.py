import numpy as np
import pytest
import torch

from alignscope.errors import TransformSpecError
from alignscope.geometry.transforms import default_transforms, parse_transform, parse_transforms
from alignscope.geometry.warping import disk_mask, inverse_warp, sample_affine, valid_mask, warp


def one(spec):
    (t,) = parse_transform(spec)
    return t


@pytest.mark.parametrize("spec", ["rotate30", "rotate-45", "scale0.7", "translate16,-8", "roll3,4", "shear15",
                                  "hflip", "vflip", "rot90", "rot180", "rot270", "identity", "rotate30+scale0.8"])
def test_spec_round_trips(spec):
    t = one(spec)
    assert t.spec == spec
    assert one(t.spec) == t


def test_sweep_expands_inclusively():
    ts = parse_transform("rotate:-90:90:15")
    assert [t.magnitude for t in ts] == list(range(-90, 91, 15))
    assert all(t.sweep == "rotate:-90:90:15" for t in ts)
    assert [t.spec for t in parse_transform("scale:0.5:2:0.5")] == ["scale0.5", "scale1", "scale1.5", "scale2"]


@pytest.mark.parametrize("bad", ["rotate", "spin30", "scale0", "scale-1", "translate1.5,0", "translate3", "shear90",
                                 "rotate:0:90", "rotate:0:90:0", "rotate:90:0:15", "roll2,2+rotate10", "", "zoom:1:2:1"])
def test_bad_specs_are_usage_errors_with_examples(bad):
    with pytest.raises(TransformSpecError) as info:
        parse_transform(bad)
    assert info.value.exit_code == 2
    assert "rotate30" in str(info.value)


def test_composition_applies_left_to_right():
    a, b = one("rotate30"), one("scale0.5")
    composed = one("rotate30+scale0.5").matrix(10, 10)
    assert composed == pytest.approx(b.matrix(10, 10) @ a.matrix(10, 10))
    translate_then_rotate = one("translate4,0+rot90").matrix(8, 8)
    # the point at the centre is moved right, then rotated counter-clockwise: it ends up above the centre
    moved = translate_then_rotate @ np.array([0.0, 0.0, 1.0])
    assert moved[:2] == pytest.approx([0.0, -1.0])


def test_rotation_is_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 4] = 1.0  # right of the centre
    for spec in ("rot90", "rotate90"):
        y = warp(x, one(spec))
        assert y[0, 0, 0, 2] == pytest.approx(1.0, abs=1e-6)  # now above the centre


@pytest.mark.parametrize("spec", ["rot90", "rot180", "rot270", "hflip", "vflip", "translate2,-3"])
def test_exact_index_ops_agree_with_grid_sample(spec):
    x = torch.randn(2, 3, 8, 8)
    t = one(spec)
    assert t.exact_on(8, 8)
    resampled = sample_affine(x, np.linalg.inv(t.matrix(8, 8)))
    assert torch.allclose(warp(x, t), resampled, atol=1e-5)


def test_rot90_four_times_and_hflip_twice_are_identity():
    x = torch.randn(1, 2, 6, 6)
    y = x
    for _ in range(4):
        y = warp(y, one("rot90"))
    assert torch.equal(y, x)
    assert torch.equal(warp(warp(x, one("hflip")), one("hflip")), x)


@pytest.mark.parametrize("spec", ["rotate30", "scale0.8", "scale1.3", "shear20", "rotate-10+scale1.1", "translate3,5"])
def test_warp_then_inverse_is_unchanged_inside_valid_mask(spec):
    torch.manual_seed(0)
    # a smooth field: bilinear resampling of it is nearly exact
    coarse = torch.randn(1, 3, 6, 6)
    x = torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bicubic", align_corners=False)
    t = one(spec)
    back = inverse_warp(warp(x, t), t)
    # valid where every sample of the return trip comes from content the forward warp kept
    inner = (inverse_warp(warp(torch.ones(1, 1, 48, 48), t), t)[0, 0] >= 0.999).float()
    assert inner.sum() > 0.3 * inner.numel()
    error = ((back - x).abs() * inner).max()
    assert error < 0.05 * x.abs().max(), error
    # un-warping samples outside the map (cells are invalid) exactly when g moves points outwards;
    # zooming out (scale0.8) keeps every cell
    assert (valid_mask(t, 48, 48) == 0).any() == (spec != "scale0.8")


def test_valid_mask_translation_counts_cells():
    mask = valid_mask(one("translate8,0"), 16, 16, stride=4)  # 2 cells to the right
    assert mask.sum() == 16 * 14
    assert (mask[:, -2:] == 0).all()


def test_disk_mask_is_centred_and_shrinks():
    full, shrunk = disk_mask(9, 9), disk_mask(9, 9, shrink_cells=1)
    assert full[4, 4] == 1 and full[0, 0] == 0 and full[4, 0] == 1
    assert shrunk[4, 0] == 0 and shrunk.sum() < full.sum()
    assert torch.equal(full, full.flip(0)) and torch.equal(full, full.t())


def test_defaults_contrast_translations_with_rotations():
    specs = [t.spec for t in default_transforms(32)]
    assert specs[:3] == ["identity", "translate32,0", "translate5,0"]
    assert {"rotate15", "rotate45", "rot90", "scale0.8", "scale1.25", "hflip"} <= set(specs)


def test_parse_transforms_deduplicates():
    assert [t.spec for t in parse_transforms(["rot90", "rot90", "hflip"])] == ["rot90", "hflip"]
