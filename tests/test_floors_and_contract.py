"""No meaningless number printed as a normal one, no raw exception from the API, the caller's model left as it was.

Ground truths by construction: near-duplicate images (one pixel apart) have a chance distance far
below the floor; a translation by the whole width leaves no valid cell; unrelated random images
sit far above the floor. Tiny random convolutional nets keep every case fast.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

import alignscope
from alignscope.errors import AlignscopeError, ImageError, UsageError, UsageTypeError
from alignscope.floors import CHANCE_FLOOR, MIN_VALID_CELLS, MIN_VALID_FRACTION, near_duplicates, support_shortfall
from alignscope.inputs.pairs import chance_partners
from alignscope.report.files import csv_text, restore_text_cells

SIZE = 32
NORM = dict(input_size=(3, SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _analyze(images, transforms, **kwargs):
    return alignscope.analyze(_net(), transforms=transforms, images=images, layers=["0", "2"], batch_size=8, **NORM,
                              **kwargs)


def test_unrelated_images_sit_far_above_the_chance_floor():
    report = _analyze(_images(6), ["rot90", "translate4,0"], per_image=True)
    layers = report.table[report.table["kind"] == "layer"]
    assert layers["aligned_error"].notna().all() and (layers["n_images"] == 6).all()
    assert (layers["why_missing"] == "").all() and (layers["n_near_duplicate"] == 0).all()
    x = _images(6)
    _, near = near_duplicates(x, chance_partners(x))
    assert not near.any()
    ratios = (x - chance_partners(x)).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert ratios.min() > 10 * CHANCE_FLOOR


def test_near_duplicate_images_are_left_out_and_say_why():
    # images 0 and 1 one pixel apart (each the other's chance partner), image 2 unrelated
    x = torch.cat([_images(1).repeat(2, 1, 1, 1), _images(1, seed=7)])
    x[1, :, 5, 5] += 0.05  # one pixel apart: chance is no scale for "how far after the warp"
    report = _analyze(x, ["rot90"], per_image=True)
    layers = report.table[report.table["kind"] == "layer"]
    assert (layers["n_images"] == 1).all() and (layers["n_near_duplicate"] == 2).all()
    assert layers["aligned_error"].notna().all()  # the unrelated image's
    # the raw distances are still there (chance is not 0); only the ratios are left out
    rows = report.per_image[(report.per_image["layer"] != "output") & report.per_image["image"].isin(["0", "1"])]
    assert (rows["chance_distance"] > 0).all() and rows["aligned_error"].isna().all() and rows["aligned"].notna().all()
    assert any("near-duplicate" in w for w in report.warnings())


def test_a_run_on_copies_of_one_image_is_refused_not_reported():
    x = _images(1).repeat(3, 1, 1, 1)
    x[1, :, 5, 5] += 0.05
    with pytest.raises(ImageError, match="no layer could be measured: at every layer each of the 3 images"):
        _analyze(x, ["rot90"])


def test_a_layer_whose_maps_are_mostly_constant_is_still_measured():
    """Random weights can make maps a large constant plus a small image-dependent part: the floor is on the images,
    so the ratios of the image-dependent parts are still reported."""
    net = _net()
    with torch.no_grad():
        net[0].bias.add_(100.0)  # maps of layer 0: about 100 everywhere, the image's part on top
    report = alignscope.analyze(net, transforms=["rot90"], images=_images(4), layers=["0"], per_image=True, **NORM)
    rows = report.per_image[report.per_image["layer"] == "0"]
    assert (rows["chance_distance"] < 0.05 * rows["reference_norm"]).all()  # what a floor on the maps would drop
    assert report.table.query("kind == 'layer'")["aligned_error"].notna().all()


def test_identical_images_are_named_as_such():
    x = torch.cat([_images(1).repeat(2, 1, 1, 1), _images(1, seed=7)])
    report = _analyze(x, ["hflip"])
    layers = report.table.query("kind == 'layer'")
    assert (layers["n_identical"] == 2).all() and (layers["n_images"] == 1).all()
    assert any("duplicate images" in w for w in report.warnings())
    with pytest.raises(ImageError, match="copies of one image"):
        _analyze(x[:2], ["hflip"])


def test_no_valid_cells_is_its_own_diagnosis():
    report = _analyze(_images(4), [f"translate{SIZE},0", "rot90"])
    moved = report.table.query(f"kind == 'layer' and transform == 'translate{SIZE},0'")
    assert moved["aligned_error"].isna().all() and (moved["n_images"] == 0).all()
    assert moved["why_missing"].str.startswith("no valid cells").all()
    assert (moved["n_identical"] == 0).all()  # nothing was compared, so nothing is called a duplicate
    verdict = next(v for v in report.verdicts() if v.startswith(f"translate{SIZE},0"))
    assert "no valid cells" in verdict and "chance distance" not in verdict
    assert report.table.query("kind == 'layer' and transform == 'rot90'")["aligned_error"].notna().all()


@pytest.mark.parametrize("valid, total, short", [(0, 100, True), (3, 100, True), (4, 100, False), (9, 1000, True),
                                                 (10, 1000, False), (49, 49, False)])
def test_support_floor_is_the_larger_of_a_count_and_a_fraction(valid, total, short):
    assert bool(support_shortfall(valid, total)) is short
    assert (valid >= max(MIN_VALID_CELLS, MIN_VALID_FRACTION * total)) is not short


def test_a_sliver_of_valid_cells_is_not_reported():
    report = _analyze(_images(4), ["scale40"])
    rows = report.table.query("kind == 'layer'")
    cells = rows["valid_fraction"] * rows["height"] * rows["width"]
    below = cells.round() < [max(MIN_VALID_CELLS, MIN_VALID_FRACTION * h * w) for h, w in zip(rows["height"], rows["width"])]
    assert below.any()
    assert rows.loc[below, "aligned_error"].isna().all() and rows.loc[below, "why_missing"].str.contains("valid cells").all()


# --- the API's contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, builtin", [
    (dict(batch_size=2.5), UsageTypeError, TypeError),
    (dict(transforms=30), UsageTypeError, TypeError),
    (dict(transforms=[["rot90"]]), UsageTypeError, TypeError),
    (dict(layers=[]), UsageError, ValueError),
    (dict(layers=5), UsageTypeError, TypeError),
    (dict(images=torch.zeros(0, 3, SIZE, SIZE)), ImageError, ValueError),
    (dict(images=[torch.rand(3, SIZE, SIZE), torch.rand(3, 8, 8)]), ImageError, ValueError),
    (dict(seed=1.5), UsageTypeError, TypeError),
])
def test_bad_arguments_raise_one_alignscope_error_that_is_also_the_builtin(kwargs, error, builtin):
    arguments = dict(transforms=["rot90"], images=_images(4), layers=["0"], batch_size=4) | kwargs
    with pytest.raises(error) as caught:
        alignscope.analyze(_net(), **NORM, **arguments)
    assert isinstance(caught.value, builtin) and isinstance(caught.value, AlignscopeError)
    assert "\n" not in str(caught.value)


def test_a_list_of_image_tensors_is_the_same_as_their_stack():
    x = _images(4)
    as_list = _analyze([image for image in x], ["rot90"]).table
    stacked = _analyze(x, ["rot90"]).table
    pd.testing.assert_series_equal(as_list["aligned_error"], stacked["aligned_error"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_fed_and_measured(dtype):
    if dtype is torch.float16 and not hasattr(torch.nn.functional, "conv2d"):
        pytest.skip("no float16 convolution")
    x = _images(6)
    full = alignscope.analyze(_net(), transforms=["rot90"], images=x, layers=["0", "2"], **NORM).table
    try:
        half = alignscope.analyze(_net().to(dtype), transforms=["rot90"], images=x, layers=["0", "2"], **NORM).table
    except AlignscopeError as exc:  # a CPU build without float16 kernels says so in one line; never a raw error
        assert dtype is torch.float16, exc
        return
    rows = full["kind"] == "layer"
    assert half.loc[rows, "aligned_error"].notna().all()
    # the same measurement up to the model's own rounding
    assert (half.loc[rows, "aligned_error"] - full.loc[rows, "aligned_error"]).abs().max() < 0.05


def _state(module: nn.Module) -> dict:
    return {
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "values": [p.detach().clone() for p in module.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()],
        "device": {p.device for p in module.parameters()},
        "contiguous": [p.is_contiguous() for p in module.parameters()],
        "dtype": {p.dtype for p in module.parameters()},
    }


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in a if k != "values") and all(torch.equal(x, y) for x, y in zip(a["values"], b["values"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_model_is_left_as_it_was_found(dtype):
    net = _net().to(dtype).train()
    net[0].weight.requires_grad_(False)
    net[2].register_forward_hook(lambda *args: None)  # the caller's own hook stays
    before = _state(net)
    alignscope.analyze(net, transforms=["rot90"], images=_images(4), layers=["0", "2"], channels_last=True, **NORM)
    assert _same(before, _state(net))
    with pytest.raises(ImageError):  # fails after the model was loaded, probed and put in eval mode
        alignscope.analyze(net, transforms=["rot90"], images=torch.rand(4, 3, SIZE + 1, SIZE), layers=["0"], **NORM)
    assert _same(before, _state(net))
    from alignscope.explain import explain

    explain(net, layer="2", transform="rot90", images=_images(4), **NORM)
    assert _same(before, _state(net))


# --- CSV exports ----------------------------------------------------------------------------------------------


def test_csv_cells_that_would_run_as_formulas_are_neutralised_and_read_back():
    table = pd.DataFrame({"model": ["=HYPERLINK(\"x\")", "+1+1", "@SUM(A1)", "-cmd", "resnet"],
                          "grid_residual": ["-0.5,0.5", "", "1,2", "-1e-3,2", "'=already"], "n": [1, 2, 3, 4, 5]})
    text = csv_text(table)
    assert "'=HYPERLINK" in text and "'+1+1" in text and "'@SUM" in text and "'-cmd" in text
    assert "\n-0.5,0.5" not in text and '"-0.5,0.5"' in text and "''=already" in text  # numbers stay as they are
    from io import StringIO

    back = restore_text_cells(pd.read_csv(StringIO(text), keep_default_na=False))
    assert back["model"].tolist() == table["model"].tolist()
    assert back["grid_residual"].tolist() == table["grid_residual"].tolist()


def test_image_names_that_start_a_formula_are_neutralised_in_per_image_csv(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(["=cmd.png", "@x.png", "plain.png"]):
        Image.fromarray((_images(1, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / name)
    monkeypatch.chdir(folder)  # relative paths: the image column then starts with the file name
    report = alignscope.analyze(_net(), transforms=["rot90"], images=["=cmd.png", "@x.png", "plain.png"], layers=["0"],
                                per_image=True, **NORM)
    out = report.save(tmp_path / "report")
    text = (out / "per_image.csv").read_text()
    assert "'=cmd.png" in text and "'@x.png" in text and ",=cmd" not in text
    assert "=cmd.png" in set(report.per_image["image"])  # the in-memory table and run.json keep the raw names


def test_property_every_row_is_a_number_with_support_or_nan_with_a_reason():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    specs = st.one_of(
        st.integers(-180, 180).map(lambda a: f"rotate{a}"),
        st.sampled_from([0.05, 0.5, 0.9, 1.5, 4.0, 40.0]).map(lambda s: f"scale{s:g}"),
        st.tuples(st.integers(-80, 80), st.integers(-80, 80)).map(lambda t: f"translate{t[0]},{t[1]}"),
        st.sampled_from(["hflip", "vflip", "rot90", "rot180", "identity", "shear30"]),
    )

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(spec=specs, size=st.sampled_from([16, 24, 33]), batch=st.integers(1, 5), n=st.integers(2, 5))
    def check(spec, size, batch, n):
        images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(size + n))
        try:
            report = alignscope.analyze(_net(), transforms=[spec], images=images, layers=["0", "2"], batch_size=batch,
                                        input_size=(3, size, size), mean=(0.5,) * 3, std=(0.25,) * 3)
        except AlignscopeError:
            return
        rows = report.table[report.table["kind"] == "layer"]
        for _, row in rows.iterrows():
            if math.isfinite(row["aligned_error"]):
                cells = round(row["valid_fraction"] * row["height"] * row["width"])
                assert row["n_images"] > 0 and not support_shortfall(cells, row["height"] * row["width"])
                assert row["why_missing"] == ""
            else:
                assert row["why_missing"], row.to_dict()

    del hypothesis
    check()


def test_files_that_are_not_images_are_listed_as_left_out(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((_images(1, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".hidden").write_text("")
    report = alignscope.analyze(_net(), transforms=["rot90"], images=str(folder), layers=["0"], **NORM)
    skipped = report.meta["images_skipped"]
    assert [entry["path"].endswith("notes.txt") for entry in skipped] == [True]
    assert "not an image file" in skipped[0]["reason"] and len(report.meta["images_used"]) == 3
    assert any("notes.txt" in w and "left out" in w for w in report.warnings())
