"""Sampling lattices and the registered comparison, on networks whose answers are known by construction.

A network whose kernels share g's symmetry is exactly g-equivariant up to
its lattice: on the registered grid it must align to float precision, while
the centred frame (aligned_error) misses by half a pixel per level.
"""
import numpy as np
import pytest
import torch
from torch import nn

import alignscope
from alignscope.model.capture import probe_layers, select_layers
from alignscope.model.lattice import Lattice
from alignscope.model.lattice_probe import measure_lattices
from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import grid_residual, registered_sampling_matrix

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def symmetrize(weight: torch.Tensor, symmetry: str) -> torch.Tensor:
    if symmetry == "hflip":
        return (weight + weight.flip(-1)) / 2
    return sum(torch.rot90(weight, q, dims=(-2, -1)) for q in range(4)) / 4


def strided_net(symmetry: str, same_padding: bool = False, seed: int = 0) -> nn.Sequential:
    """Three stride-2 3x3 convs (padding 1, or TF "SAME" with timm's Conv2dSame) with symmetric kernels."""
    from timm.layers import Conv2dSame

    torch.manual_seed(seed)
    layers, channels = [], 3
    for _ in range(3):
        conv = Conv2dSame(channels, 8, 3, stride=2) if same_padding else nn.Conv2d(channels, 8, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(symmetrize(conv.weight, symmetry))
        layers += [conv, nn.ReLU()]
        channels = 8
    return nn.Sequential(*layers).eval()


def run(net, transforms, images, layers):
    torch.manual_seed(0)
    return alignscope.analyze(net, transforms=transforms, images=images, layers=layers, input_size=tuple(images.shape[1:]),
                              mean=MEAN, std=STD, batch_size=4).table


def noise(size: int) -> torch.Tensor:
    return torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("same_padding", [False, True], ids=["pad1", "tf_same"])
@pytest.mark.parametrize("symmetry", ["hflip", "rot90"])
@pytest.mark.parametrize("source", ["photos", "noise"])
def test_symmetric_strided_net_aligns_on_the_registered_grid_only(symmetry, same_padding, source, photo_tensor):
    images = photo_tensor if source == "photos" else noise(64)
    table = run(strided_net(symmetry, same_padding), [symmetry], images, ["1", "3", "5"])
    assert list(table["stride"]) == [2, 4, 8]
    assert (table["registered_error"] < 1e-5).all(), table[["layer", "grid_residual", "registered_error"]]
    assert (table["aligned_error"] > 0.1).all(), table[["layer", "aligned_error"]]
    assert (table["grid_residual"] != "0,0").all()
    assert (table["registered_fraction"] > 0.3).all()


def test_residuals_and_offsets_of_pad1_and_same_padding(photo_tensor):
    # pad 1 on an even input: cell j at 2j, 4j, 8j (offset 0); "SAME": at 2j+1, 4j+3, 8j+7 (offset s - 1)
    pad1 = run(strided_net("hflip"), ["hflip"], photo_tensor, ["1", "3", "5"])
    same = run(strided_net("hflip", same_padding=True), ["hflip"], photo_tensor, ["1", "3", "5"])
    assert list(pad1["offset_x"]) == [0, 0, 0] and list(pad1["offset_y"]) == [0, 0, 0]
    assert list(same["offset_x"]) == [1, 3, 7] and list(same["offset_y"]) == [1, 3, 7]
    # hflip sends pixel p to 63 - p: r = 63 - 2 offset - stride (w - 1)
    assert list(pad1["grid_residual"]) == ["1,0", "3,0", "7,0"]
    assert list(same["grid_residual"]) == ["-1,0", "-3,0", "-7,0"]


def test_odd_input_is_a_centred_lattice_and_both_columns_agree(photo_tensor):
    from alignscope.inputs.images import image_stream
    from alignscope.model.build import DataConfig

    cfg = DataConfig(input_size=(3, 65, 65), crop_pct=1.0, interpolation="bilinear")
    photos = torch.cat([b.pixels for b in image_stream(None, cfg, batch_size=8)])
    for images in (photos, noise(65)):
        table = run(strided_net("rot90"), ["hflip", "rot90"], images, ["1", "3", "5"])
        assert (table["grid_residual"] == "0,0").all()
        assert (table["registered_error"] == table["aligned_error"]).all()
        assert (table["registered_error_ci_high"] == table["aligned_error_ci_high"]).all()
        assert (table["registered_error"] < 1e-5).all()


@pytest.mark.parametrize("order", [4, 8])
def test_e2cnn_strided_group_pooled_output_aligns_on_the_registered_grid(order, photo_tensor):
    pytest.importorskip("e2cnn")
    from e2cnn import gspaces
    from e2cnn import nn as enn

    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            space = gspaces.Rot2dOnR2(N=order)
            self.in_type = enn.FieldType(space, 3 * [space.trivial_repr])
            hidden = enn.FieldType(space, 4 * [space.regular_repr])
            self.conv1 = enn.R2Conv(self.in_type, hidden, 5, padding=2)
            self.relu = enn.ReLU(hidden)
            self.conv2 = enn.R2Conv(hidden, hidden, 3, padding=1, stride=2)
            self.pool = enn.GroupPooling(hidden)
            self.pooled = nn.Identity()

        def forward(self, x):
            h = self.conv2(self.relu(self.conv1(enn.GeometricTensor(x, self.in_type))))
            return self.pooled(self.pool(h).tensor)

    table = run(Strided(), ["rot90", "rot180"], photo_tensor, ["pooled"])
    assert (table["stride"] == 2).all()
    assert (table["registered_error"] < 1e-4).all(), table[["transform", "registered_error"]]
    assert (table["aligned_error"] > 0.05).all(), table[["transform", "aligned_error"]]


def _stage_lattices(name: str):
    import timm

    net = timm.create_model(name, pretrained=False).eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            # timm zero-initializes the last BatchNorm of each residual block: a fresh block would be the identity
            # and its support that of its shortcut alone
            nn.init.ones_(module.weight)
    stages, _ = select_layers(probe_layers(net, (3, 224, 224)), None)
    found = measure_lattices(net, stages, (3, 224, 224))
    return stages, [found[layer.name] for layer in stages]


def test_tf_efficientnet_lite0_stages_sit_after_the_centred_frame():
    stages, lattices = _stage_lattices("tf_efficientnet_lite0")
    assert [layer.stride for layer in stages] == [2, 4, 8, 16, 32]
    assert all(isinstance(lattice, Lattice) for lattice in lattices), lattices
    assert [lattice.stride for lattice in lattices] == [(s, s) for s in (2, 4, 8, 16, 32)]
    assert [lattice.centred_shift for lattice in lattices] == [(v, v) for v in (0.5, 1.5, 3.5, 7.5, 15.5)]


def test_resnet18_offsets_by_hand():
    # conv1 7x7/2 pad 3 on 224 (even): cell j at 2j, support 2j-3..2j+3. maxpool 3x3/2 pad 1 takes act1 cells
    # 2j-1..2j+1, centred on act1 cell 2j -> pixel 4j. layer1's 3x3/1 convs keep it; the first 3x3/2 pad 1 conv
    # of layers 2-4 (and its 1x1/2 shortcut) takes cell 2j again: 8j, 16j, 32j. Every offset is 0.
    # Reach: 3 (conv1), + 1 act1 cell (2 px) for the pool = 5, + four 3x3 convs at stride 4 (4 px each) = 21.
    stages, lattices = _stage_lattices("resnet18")
    assert [layer.name for layer in stages] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [lattice.offset for lattice in lattices] == [(0.0, 0.0)] * 5
    assert [lattice.stride_x for lattice in lattices] == [2, 4, 8, 16, 32]
    assert lattices[0].reach_x == (3, 3) and lattices[1].reach_x == (21, 21)


# --- conventions of the lattice geometry -----------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 32), (6, 10), (7, 5)])
@pytest.mark.parametrize("spec", ["rotate30", "scale0.8", "hflip", "shear15+translate3,-2"])
def test_convention_centred_lattice_reproduces_the_centred_warp(spec, shape):
    stride = 4
    lattice = Lattice(stride, stride, (stride - 1) / 2, (stride - 1) / 2, (1, 1), (1, 1))
    transform = parse_transform(spec)[0]
    image = (shape[0] * stride, shape[1] * stride)
    assert np.allclose(registered_sampling_matrix(transform, lattice, shape, image), transform.matrix(*image), atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (7, 5)])
@pytest.mark.parametrize("offset", [0.0, 1.0, 3.0])
def test_convention_flip_residual_formula(offset, shape):
    # hflip sends pixel p to W - 1 - p; cell j of b = F(g x) moves to w - 1 - j: r = W - 1 - 2 offset - s (w - 1)
    stride = 4
    lattice = Lattice(stride, stride, offset, offset, (1, 1), (1, 1))
    image = (shape[0] * stride, shape[1] * stride)
    for spec, axis in (("hflip", 1), ("vflip", 0)):
        residual = grid_residual(parse_transform(spec)[0], lattice, shape, image, stride)
        expected = image[axis] - 1 - 2 * offset - stride * (shape[axis] - 1)
        assert residual == ((expected, 0.0) if axis == 1 else (0.0, expected))
    # not exact on the grid: no residual (the registered warp interpolates instead)
    assert grid_residual(parse_transform("rotate30")[0], lattice, shape, image, stride) is None


@pytest.mark.parametrize("size, expected", [(64, ["reference", "moved", "registered", "moved"]), (65, ["reference", "moved", "moved"])])
def test_one_extra_forward_for_all_residuals_and_none_when_they_are_zero(size, expected):
    from alignscope.model.lattice_probe import attach_lattices
    from alignscope.inputs.pairs import PairFeeder
    from alignscope.geometry.transforms import parse_transforms

    net = strided_net("hflip")
    layers, _ = select_layers(probe_layers(net, (3, size, size)), ["1", "3", "5"])
    assert attach_lattices(net, layers, (3, size, size)) == {}
    # hflip: residuals 1, 3, 7 px at the three layers, fed as one stacked batch; the second transform is hflip
    # spelled differently (same residuals), so it reuses those maps; the odd input has no residual at all
    feeder = PairFeeder(layers, parse_transforms(["hflip", "hflip+vflip+vflip"]), "none", [0.0] * 3, (size, size), torch.device("cpu"))
    inputs = list(feeder.model_inputs(noise(size)[:4]))
    assert [kind for _, _, kind, _ in inputs] == expected
    if size == 64:
        assert inputs[2][3].shape[0] == 3 * 4  # three distinct residuals, four images each


def test_the_warp_search_also_starts_from_the_registered_warp():
    from types import SimpleNamespace

    from alignscope.fit.fitting import Calibrator, FitRequest

    lattice = Lattice(stride_x=2.0, stride_y=2.0, offset_x=1.0, offset_y=1.0, reach_x=(1.0, 1.0), reach_y=(1.0, 1.0))
    hflip = parse_transform("hflip")[0]
    layer = SimpleNamespace(lattice=lattice, shape=(4, 16, 16))
    calibrator = Calibrator(FitRequest.build(optimal="family"), image_size=(32, 32))
    (start,) = calibrator._registered_start(SimpleNamespace(layer=layer, transform=hflip))
    np.testing.assert_allclose(start, registered_sampling_matrix(hflip, lattice, (16, 16), (32, 32)))
    # SAME-like offsets: the registered flip is the centred one shifted by half a cell, so the two starts differ
    assert abs(start[0, 2]) > 1e-3
    assert calibrator._registered_start(SimpleNamespace(layer=SimpleNamespace(lattice=None, shape=(4, 16, 16)),
                                                        transform=hflip)) == []
    assert Calibrator(FitRequest.build(optimal="family"))._registered_start(SimpleNamespace(layer=layer, transform=hflip)) == []


def test_border_effects_of_the_registered_comparison_reach_the_report():
    """On 16 px images the third stride-2 layer's cells all see past the image: the registered comparison there
    keeps the shift's border effects, and the report (not only the log) says so, naming the layer and the shift."""
    images = noise(16)
    torch.manual_seed(0)
    report = alignscope.analyze(strided_net("hflip"), transforms=["hflip"], images=images, layers=["1", "3", "5"],
                                input_size=(3, 16, 16), mean=MEAN, std=STD, batch_size=4)
    assert report.meta["registered_border"] == [{"layer": "5", "transform": "hflip", "shift_px": [7.0, 0.0]}]
    lines = [line for line in report.warnings() if "border effects" in line]
    assert len(lines) == 1 and "5 / hflip (7,0 px)" in lines[0]
    interior = report.table.set_index("layer")["registered_fraction"]
    assert interior["1"] < 1 and interior["5"] == 1  # layer 1 keeps interior cells; layer 5 has none


# --- the probe itself: one capture path, probes the model accepts, bounded cost ---------------------------------

class _Pad1Stack(nn.Module):
    """Three 3 x 3 stride-2 convs with padding 1: lattices stride 2, 4, 8 at offsets 0 (cell j at 2^k j)."""

    def __init__(self, fixed_size: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fixed_size = fixed_size
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, stride=2, padding=1) for i in range(3))

    def forward(self, x):
        if self.fixed_size is not None:
            assert x.shape[-1] == self.fixed_size and x.shape[-2] == self.fixed_size, "input size must be fixed"
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


PAD1_EXPECTED = {f"convs.{k}": (2.0 ** (k + 1), 0.0) for k in range(3)}


def _probe(net, size=64, request=None):
    alignscope.model.lattice_probe._cache.clear()  # nets of one architecture and seed that differ in Python behaviour only
    layers, _ = select_layers(probe_layers(net, (3, size, size)), request)
    return layers, measure_lattices(net, layers, (3, size, size))


@pytest.mark.parametrize("fixed", [None, 64], ids=["any_size", "fixed_size"])
def test_probe_finds_known_lattices_whether_or_not_the_model_takes_other_sizes(fixed):
    net = _Pad1Stack(fixed).eval()
    layers, found = _probe(net, request=["convs.*"])
    for name, (stride, offset) in PAD1_EXPECTED.items():
        assert isinstance(found[name], Lattice), found[name]
        assert found[name].stride == (stride, stride) and found[name].offset == (offset, offset)


class _WithGlobal(nn.Module):
    """A local conv, then a layer that adds the image mean (every cell sees every pixel), optionally of fixed size."""

    def __init__(self, fixed_size: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fixed_size = fixed_size
        self.local = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mixed = nn.Identity()

    def forward(self, x):
        if self.fixed_size is not None and x.shape[-1] != self.fixed_size:
            raise RuntimeError(f"Input width ({x.shape[-1]}) doesn't match model ({self.fixed_size})")
        h = self.local(x)
        return self.mixed(h + h.mean(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize("fixed", [None, 64], ids=["any_size", "fixed_size"])
def test_a_global_layer_has_no_lattice_and_says_why_without_an_exception(fixed):
    net = _WithGlobal(fixed).eval()
    _, found = _probe(net, request=["local", "mixed"])
    assert found["local"].stride == (2.0, 2.0) and found["local"].offset == (0.0, 0.0)
    assert isinstance(found["mixed"], str)
    assert ("global" in found["mixed"]) if fixed is None else ("only input size" in found["mixed"])


class _Layouts(nn.Module):
    """The same stride-4 map returned as NCHW, channels-last, an element of a list, and a token sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.nhwc = nn.Identity()
        self.pair = _Pair()
        self.tokens = nn.Identity()

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        a = self.nhwc(h.permute(0, 2, 3, 1))
        b = self.pair(h)[1]
        c = self.tokens(h.flatten(2).transpose(1, 2))
        return a.mean() + b.mean() + c.mean()


class _Pair(nn.Module):
    def forward(self, h):
        return [h[:, :3], h[:, 3:]]


def test_every_layout_is_probed_through_the_analysis_reader():
    # list elements, channels-last maps and token grids: the hook code the analysis uses reads each right
    net = _Layouts().eval()
    layers, found = _probe(net, request=["conv2", "nhwc", "pair", "tokens"])
    assert {str(layer.layout).split()[0] for layer in layers} >= {"NCHW", "NHWC", "tokens"}
    expected = found["conv2"]
    assert isinstance(expected, Lattice) and expected.stride == (4.0, 4.0)
    for name in ("nhwc", "pair[0]", "pair[1]", "tokens"):
        assert found[name] == expected, (name, found[name])


def test_a_support_below_float32s_range_is_reported_not_measured():
    net = _Pad1Stack().eval()
    with torch.no_grad():
        for conv in net.convs:
            conv.weight.mul_(1e-21)  # the gradient of convs.2 at the input: about (1e-21)^3 * 1e30
    _, found = _probe(net, request=["convs.2"])
    assert "float32" in found["convs.2"]


def test_the_probe_costs_the_same_passes_for_many_layers_and_leaves_the_model_as_it_was():
    calls = []

    def count(module, args):
        calls.append(args[0].shape[0])

    for request in (["convs.2"], ["convs.*"]):
        net = _Pad1Stack().eval()
        net.convs[0].weight.requires_grad_(False)  # a frozen parameter stays frozen, the others trainable
        handle = net.register_forward_pre_hook(count)
        calls.clear()
        alignscope.model.lattice_probe._cache.clear()
        _probe(net, request=request)
        handle.remove()
        if request == ["convs.2"]:
            one_layer = len(calls)
        else:
            assert len(calls) == one_layer  # more layers: bigger batches, not more passes
            assert max(calls) == 4 * 3  # four cells per layer, three layers in one pass
        assert [p.requires_grad for p in net.parameters()] == [False, True, True, True, True, True]
        assert not net.training


def test_the_layers_command_says_why_a_listed_layer_has_no_offsets():
    import io

    import pandas as pd
    from click.testing import CliRunner

    from alignscope.cli.main import app

    # a ViT's blocks are global attention: listed, no offsets, and the reason in the table
    result = CliRunner().invoke(app, ["layers", "vit_tiny_patch16_224", "--no-pretrained", "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output)).fillna("")
    stages = table[table["default"]]
    assert (stages["no_lattice"] != "").all() and stages["lattice_note"].str.len().gt(20).all()
    assert stages["offset_x"].eq("").all()


def test_a_model_that_refuses_the_asked_input_size_is_a_usage_error():
    from alignscope.errors import UsageError

    with pytest.raises(UsageError, match="refuses a 3x32x32 input .*input size must be fixed"):
        probe_layers(_Pad1Stack(64).eval(), (3, 32, 32))
