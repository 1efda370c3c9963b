"""Lie derivatives (``lie=...``): answers known by construction, and the forward-mode value against a symmetric
finite difference through alignscope's own warps."""
import math

import pytest
import torch
from torch import nn

import alignscope
from alignscope.errors import UsageError
from alignscope.geometry.generators import GENERATORS, cell_displacement
from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import inverse_warp, warp
from alignscope.model.capture import MODEL_OUTPUT, FeatureCapture, probe_layers
from alignscope.engine.lie import lie_derivatives
from alignscope.report.lie import lie_table

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # black is 0: the fill of the derivatives is the padding


def _images(n=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return nn.functional.avg_pool2d(torch.randn(n, 3, size, size, generator=generator), 3, 1, 1)


def _lie_rows(report):
    rows = report.table[report.table["kind"] == "lie"]
    return rows.set_index(["transform", "layer"])


class Ramp(nn.Module):
    """F(x) = w ⊙ x with w the column index: multiplying by a position is the textbook non-equivariant map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.out = nn.Identity()

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
        return self.out(self.stem(x) * ramp)


def test_a_stride_one_linear_convolution_commutes_with_translation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Identity(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                        nn.Identity())
    report = alignscope.analyze(net.eval(), transforms=["identity"], images=_images(), layers=["1", "3"],
                                input_size=(3, 32, 32), lie=["translate_x", "translate_y", "rotate"], batch_size=6, **PLAIN)
    rows = _lie_rows(report)
    for name in ("lie-translate_x", "lie-translate_y"):
        assert rows.loc[(name, "1"), "lie_error"] < 1e-5 and (rows.loc[name, "n_images"] == 6).all()
        # the second layer reads the first one's zero padding, which is not what the image would give there:
        # exact only two cells in from the edge (the mask leaves out one)
        assert rows.loc[(name, "3"), "lie_error"] > 1e-3
    assert (rows.loc["lie-rotate", "lie_error"] > 1e-2).all()  # a generic 3x3 kernel is not rotation-invariant
    layers = [layer for layer in probe_layers(net, (3, 32, 32)) if layer.name == "3"]
    with FeatureCapture(net, layers) as capture, torch.no_grad():
        _, lie = lie_derivatives(capture, _images(), GENERATORS["translate_x"], (32, 32), 0.0)["3"]
    assert lie[..., 2:-2, 2:-2].abs().max() < 1e-4 * lie.abs().max()


def test_the_lie_derivative_of_a_ramp_is_the_neighbour_average():
    # L F = (W/2) (D(w x) - w D x) = (W/2) (x[j+1] + x[j-1]) / 2 for w = column index, D the central difference
    x = _images(4, 16)
    report = alignscope.analyze(Ramp().eval(), transforms=["identity"], images=x, layers=["out"], input_size=(3, 16, 16),
                                lie=["translate_x"], batch_size=4, output=False, **PLAIN)
    padded = nn.functional.pad(x, (1, 1, 0, 0))
    expected = 8.0 * (padded[..., 2:] + padded[..., :-2]) / 2
    mask = torch.zeros(16, 16)
    mask[1:-1, 1:-1] = 1
    maps = x * torch.arange(16.0)
    ratios = (expected * mask).flatten(1).norm(dim=1) / (maps * mask).flatten(1).norm(dim=1)
    got = _lie_rows(report).loc[("lie-translate_x", "out"), "lie_relative"]
    assert got == pytest.approx(float(ratios.mean()), rel=1e-5)


def _symmetric_difference(model, layers, x, name, t, classes=None):
    """(F-finite, F-forward-mode) per layer (and the output): (g_t^-1 F(g_t x) - g_-t^-1 F(g_-t x)) / 2t through
    alignscope's bilinear warps, which for displacements below a cell is the central difference itself."""
    spec = {"rotate": lambda v: f"rotate{math.degrees(v)!r}", "scale": lambda v: f"scale{math.exp(v)!r}",
            "shear_x": lambda v: f"shear{math.degrees(math.atan(v))!r}"}[name]
    (plus,), (minus,) = parse_transform(spec(t)), parse_transform(spec(-t))
    size = x.shape[-1]
    with FeatureCapture(model, layers, output_classes=classes) as capture, torch.no_grad():
        derivatives = lie_derivatives(capture, x, GENERATORS[name], (size, size), 0.0)
        up, down = capture(warp(x, plus, 1.0, 0.0)), capture(warp(x, minus, 1.0, 0.0))
    pairs = {}
    for layer in layers:
        stride = float(layer.stride)
        finite = (inverse_warp(up[layer.name], plus, stride) - inverse_warp(down[layer.name], minus, stride)) / (2 * t)
        pairs[layer.name] = (finite[..., 2:-2, 2:-2].float(), derivatives[layer.name][1][..., 2:-2, 2:-2])
    if classes:
        pairs[MODEL_OUTPUT] = (((up[MODEL_OUTPUT] - down[MODEL_OUTPUT]) / (2 * t)).float(), derivatives[MODEL_OUTPUT][1])
    return pairs


def _relative(pair):
    finite, lie = pair
    return float((finite - lie).norm() / lie.norm())


@pytest.mark.parametrize("name", ["rotate", "scale", "shear_x"])
def test_forward_mode_equals_a_symmetric_finite_difference_on_a_smooth_network(name):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Tanh(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    layers = [layer for layer in probe_layers(net.eval(), (3, 32, 32)) if layer.name in ("1", "3", "5")]
    net = net.double()  # float64: the finite difference at t = 1e-5 needs the digits
    x = _images(3, 32, seed=1).double()
    for key, pair in _symmetric_difference(net, layers, x, name, 1e-5, classes=5).items():
        assert _relative(pair) < 0.01, (key, _relative(pair))


@pytest.mark.parametrize("name", ["rotate", "scale", "shear_x"])
def test_forward_mode_equals_a_symmetric_finite_difference_at_a_pretrained_stem(lite0, name):
    # the stem's output is linear in the image, so only the geometry (generators, units, signs) is compared; deeper,
    # ReLU6 kinks crossed between -t and t make the finite difference itself the inexact one (docs/measures.md)
    model = lite0[0].eval()
    layers = [layer for layer in probe_layers(model, (3, 96, 96)) if layer.name == "conv_stem"]
    pair = _symmetric_difference(model, layers, _images(2, 96, seed=1), name, 1e-4)["conv_stem"]
    assert _relative(pair) < 0.02


def test_steerable_invariant_filters_barely_change_under_an_infinitesimal_rotation():
    """An e2cnn convolution from trivial to trivial fields (filters invariant under the rotations of C8, from a
    band-limited angular basis) commutes with continuous rotation up to its discretization; a random 7x7 kernel does
    not. Both commute with translation exactly (linear, stride 1). Inside the disk, away from the padding."""
    pytest.importorskip("e2cnn")
    import warnings

    from e2cnn import gspaces
    from e2cnn import nn as enn

    from alignscope.geometry.warping import disk_mask

    class Steerable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            space = gspaces.Rot2dOnR2(N=8)
            self.in_type = enn.FieldType(space, 3 * [space.trivial_repr])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.conv = enn.R2Conv(self.in_type, enn.FieldType(space, 4 * [space.trivial_repr]), 7, padding=3)
            self.out = nn.Identity()

        def forward(self, x):
            return self.out(self.conv(enn.GeometricTensor(x, self.in_type)).tensor)

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 4, 7, padding=3), nn.Identity()

        def forward(self, x):
            return self.out(self.conv(x))

    x = _images(4, 41, seed=2)
    x = nn.functional.avg_pool2d(x, 5, 1, 2)
    inside = disk_mask(41, 41, shrink_cells=4)
    ratios = {}
    for label, net in (("steerable", Steerable()), ("plain", Plain())):
        torch.manual_seed(0)
        net.eval()
        layers = [layer for layer in probe_layers(net, (3, 41, 41)) if layer.name == "out"]
        with FeatureCapture(net, layers) as capture, torch.no_grad():
            for name in ("rotate", "translate_x"):
                maps, lie = lie_derivatives(capture, x, GENERATORS[name], (41, 41), 0.0)["out"]
                ratios[(label, name)] = float((lie * inside).norm() / (maps * inside).norm())
    assert ratios[("steerable", "rotate")] < 0.05 * ratios[("plain", "rotate")]
    assert ratios[("steerable", "translate_x")] < 1e-5 and ratios[("plain", "translate_x")] < 1e-5


def test_rows_gate_and_table(tmp_path):
    report = alignscope.analyze(transforms=["rot90"], lie=True, max_images=2, layers=["blocks.1", "blocks.4"],
                                input_size=(3, 64, 64))
    rows = report.table[report.table["kind"] == "lie"]
    assert set(rows["transform"]) == {f"lie-{name}" for name in GENERATORS}
    output = rows[rows["module"] == "model output"]
    assert len(output) == 6 and output["lie_output"].between(0, 1).all() and output["lie_error"].isna().all()
    assert report.check(max={"lie_error": 1e9}).empty  # the output rows' empty lie_error is not checked
    assert len(report.check(max={"lie_output": 0.0})) == 6  # ... and lie_output checks only them
    wide = lie_table(report.table)
    assert list(wide.index) == list(GENERATORS) and list(wide.columns[:2]) == ["blocks.1", "blocks.4"]
    out = report.save(tmp_path / "r")
    assert "Lie derivatives" in (out / "report.html").read_text()
    with pytest.raises(UsageError, match="unknown Lie generator"):
        alignscope.analyze(transforms=["rot90"], lie=["rotation"], max_images=2)


def test_lie_numbers_do_not_depend_on_the_batch_size():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    x = _images(7, 24, seed=4)
    tables = [alignscope.analyze(net, transforms=["identity"], images=x, layers=["1", "3"], input_size=(3, 24, 24),
                                 lie=["rotate", "scale"], batch_size=b, **PLAIN).table for b in (3, 7)]
    columns = ["lie_error", "lie_relative", "lie_output"]
    a, b = (t[t["kind"] == "lie"][columns].to_numpy(dtype=float) for t in tables)
    assert a == pytest.approx(b, rel=1e-6, nan_ok=True)


def test_displacements_are_the_generators_in_cells():
    dj, di = cell_displacement(GENERATORS["translate_x"], 7, 14, (28, 56))  # stride 4: half the image is 7 cells
    assert torch.allclose(dj, torch.full((7, 14), 7.0, dtype=torch.float64)) and not di.any()
    dj, di = cell_displacement(GENERATORS["rotate"], 5, 5, (5, 5))
    assert dj[2, 2] == 0 and di[2, 2] == 0 and di[2, 4] == -2 and dj[0, 2] == -2  # right goes up, top goes left


def test_token_grids_get_lie_derivatives_too():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False).eval()  # random weights
    report = alignscope.analyze(vit, transforms=["identity"], images=torch.randn(2, 3, 224, 224), layers=["blocks.1"],
                                input_size=(3, 224, 224), lie=["translate_x", "rotate"], batch_size=2)
    rows = _lie_rows(report)
    assert rows.loc[("lie-translate_x", "blocks.1"), "lie_error"] > 0 and rows["n_images"].eq(2).all()
    assert rows["lie_output"].dropna().between(0, 1).all() and len(rows["lie_output"].dropna()) == 2


def test_the_terminal_table_wraps_and_the_command_line_picks_generators(tmp_path, capsys):
    from alignscope.cli.main import main
    from alignscope.errors import UsageTypeError
    from alignscope.report.lie import lie_text

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--lie-generator", "rotate", "--lie-generator", "scale", "--transform", "rot90", "--max-images",
              "2", "--input-size", "64", "--layers", "blocks.?", "--layers", "conv_stem", "--no-plots", "--out", str(out)])
    assert exit_info.value.code == 0
    import json

    import pandas as pd

    assert json.loads((out / "run.json").read_text())["lie"]["generators"] == ["rotate", "scale"]
    table = pd.read_csv(out / "alignment.csv")
    text = lie_text(table, width=80)
    assert max(map(len, text.splitlines())) <= 80
    assert sum(line.startswith("generator") for line in text.splitlines()) == 2  # 8 columns: two blocks at 80
    with pytest.raises(UsageTypeError, match="lie must be"):
        alignscope.analyze(transforms=["rot90"], lie=5, max_images=2)
