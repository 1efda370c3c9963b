"""Layouts read right: channels-last maps, token grids, window partitions, list outputs, the root stage.

Every case is built so that the right reading is known: toy modules whose
outputs are permutations of a known map, and random-weight timm models whose
raw outputs are re-read by hand here.
"""
import logging

import pytest
import timm
import torch
from torch import nn

import alignscope
from alignscope.errors import LayerError
from alignscope.model.capture import FALLBACK_CAP, FeatureCapture, probe_layers, select_layers
from alignscope.model.layouts import Layout, ModelHints, grid_fits, resolve_layout, token_grid


def _raw_output(model, name, x):
    """The module's output for ``x``, captured with a plain hook (no alignscope involved)."""
    seen = {}
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["out"]


def _capture(model, layer, x):
    with torch.no_grad(), FeatureCapture(model, [layer], stop_early=False) as capture:
        return capture(x)[layer.name]


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class _FixedSize(nn.Module):
    """Refuses any input size but one, as timm's ViT and Swin do: the resized probe gives no evidence."""

    def __init__(self, body, size):
        super().__init__()
        self.body, self.size = body, size

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError("wrong input size")
        return self.body(x)


# --- channels-last maps ----------------------------------------------------------


def test_swin_stages_are_channels_last_with_the_right_channels():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                              depths=(1, 1), num_heads=(1, 2)).eval()
    chosen, skipped = select_layers(probe_layers(model, (3, 64, 64)))
    assert [(l.name, str(l.layout), l.shape, l.stride) for l in chosen] == [
        ("layers.0", "NHWC", (24, 16, 16), 4), ("layers.1", "NHWC", (48, 8, 8), 8)]
    assert skipped == []
    x = torch.randn(2, 3, 64, 64)
    raw = _raw_output(model, "layers.1", x)
    assert raw.shape == (2, 8, 8, 48)  # what timm returns: (B, H, W, C)
    captured = _capture(model, chosen[1], x)
    assert torch.equal(captured, raw.permute(0, 3, 1, 2))


def test_convnext_block_internals_are_channels_last():
    model = timm.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)).eval()
    probed = {l.name: l for l in probe_layers(model, (3, 64, 64))}
    fc1, conv_dw = probed["stages.0.blocks.0.mlp.fc1"], probed["stages.0.blocks.0.conv_dw"]
    assert (str(fc1.layout), fc1.shape, fc1.stride) == ("NHWC", (64, 16, 16), 4)  # 4 x 16 hidden channels
    assert (str(conv_dw.layout), conv_dw.shape) == ("NCHW", (16, 16, 16))  # ambiguous shape: the resized probe decides
    assert "change with the input size" in conv_dw.layout.evidence
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_capture(model, fc1, x), _raw_output(model, "stages.0.blocks.0.mlp.fc1", x).permute(0, 3, 1, 2))


def test_ambiguous_cube_is_decided_by_the_resized_probe():
    # (B, 8, 8, 8) reads both ways; at a larger input only the spatial axes grow
    body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), _Permute(0, 2, 3, 1), nn.Identity())
    probed = {l.name: l for l in probe_layers(body, (3, 32, 32))}
    assert str(probed["2"].layout) == "NHWC" and probed["2"].shape == (8, 8, 8)
    assert str(probed["0"].layout) == "NCHW"


def test_ambiguous_cube_without_resize_is_decided_by_the_module_type():
    body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), _Permute(0, 2, 3, 1), nn.Linear(8, 8), nn.LayerNorm(8), nn.Identity())
    probed = {l.name: l for l in probe_layers(_FixedSize(body, (32, 32)), (3, 32, 32))}
    assert str(probed["body.2"].layout) == "NHWC" and "Linear" in probed["body.2"].layout.evidence
    assert str(probed["body.3"].layout) == "NHWC" and "LayerNorm" in probed["body.3"].layout.evidence
    assert str(probed["body.0"].layout) == "NCHW" and "Conv2d" in probed["body.0"].layout.evidence
    assert probed["body.4"].layout.evidence == "ambiguous shape, NCHW assumed"  # no evidence left: said so


def test_output_fmt_decides_an_ambiguous_stage():
    hints = ModelHints.from_model(type("M", (nn.Module,), {})(), (32, 32), 2)
    assert resolve_layout(torch.zeros(2, 8, 8, 8), hints).layout.kind == "NCHW"
    hints.stage_formats = {"stage": "NHWC"}
    found = resolve_layout(torch.zeros(2, 8, 8, 8), hints, name="stage")
    assert found.layout.kind == "NHWC" and "output_fmt" in found.layout.evidence


def test_feature_info_channel_count_decides_an_ambiguous_stage():
    # (B, 16, 16, 15) reads both ways at a square input; the model refuses other sizes and a permutation is no
    # Linear or Conv, so only the stage's num_chs in feature_info says that the 15 channels come last
    body = nn.Sequential(nn.Conv2d(3, 15, 2, stride=2), _Permute(0, 2, 3, 1))
    model = _FixedSize(body, (32, 32)).eval()
    model.feature_info = [{"module": "body.1", "reduction": 2, "num_chs": 15}]
    chosen, _ = select_layers(probe_layers(model, (3, 32, 32)))
    assert [(l.name, str(l.layout), l.shape) for l in chosen] == [("body.1", "NHWC", (15, 16, 16))]
    assert chosen[0].layout.evidence == "timm feature_info num_chs 15"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_capture(model, chosen[0], x), body[0](x))


# --- token grids -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_tiny_patch16_224", depth=2).eval()


def test_vit_default_layers_are_its_blocks_as_patch_grids(vit):
    chosen, skipped = select_layers(probe_layers(vit, (3, 224, 224)))
    assert [(l.name, l.shape, l.stride, str(l.layout)) for l in chosen] == [
        ("blocks.0", (192, 14, 14), 16, "tokens 1+14x14"), ("blocks.1", (192, 14, 14), 16, "tokens 1+14x14")]
    assert "1 prefix token(s) left out" in chosen[0].layout.evidence
    x = torch.randn(2, 3, 224, 224)
    raw = _raw_output(vit, "blocks.1", x)  # (B, 1 + 196, C): class token first
    grid = _capture(vit, chosen[1], x)
    assert grid.shape == (2, 192, 14, 14)
    # cell (i, j) is token 1 + 14 i + j; the class token is nowhere in the map
    for i, j in [(0, 0), (0, 13), (5, 7), (13, 13)]:
        assert torch.equal(grid[:, :, i, j], raw[:, 1 + 14 * i + j, :])


def test_vit_attention_tensors_are_not_maps(vit):
    probed = {l.name: l for l in probe_layers(vit, (3, 224, 224))}
    q_norm = probed["blocks.0.attn.q_norm"]  # (B, heads, tokens, head_dim)
    assert not q_norm.spatial and q_norm.reason.startswith("attention tensor")
    with pytest.raises(LayerError, match="attention tensor"):
        select_layers(list(probed.values()), ["blocks.0.attn.q_norm"])
    chosen, _ = select_layers(list(probed.values()), "blocks.*")
    assert all(l.layout.kind == "NLC" for l in chosen)


def test_translation_by_the_patch_size_aligns_the_patch_embedding_exactly(vit):
    images = torch.randn(4, 3, 224, 224)
    report = alignscope.analyze(vit, transforms=["translate16,0", "translate8,0"], images=images, layers=["patch_embed"],
                                input_size=(3, 224, 224), batch_size=4)
    rows = report.table[report.table["kind"] == "layer"].set_index("transform")  # the ViT's output rows aside
    assert rows.loc["translate16,0", "exact"]
    assert rows.loc["translate16,0", "aligned_error"] < 1e-5
    assert rows.loc["translate16,0", "unaligned_error"] > 0.1
    assert rows.loc["translate8,0", "aligned_error"] > 0.05  # half a patch: no whole-cell shift exists
    assert report.meta["layer_layouts"]["patch_embed"]["layout"] == "tokens 14x14"


def test_a_cnn_and_a_vit_compare_side_by_side(vit, tmp_path):
    import pandas as pd

    images = torch.randn(2, 3, 224, 224)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 8, 4, stride=4)).eval()
    paths = []
    for index, model in enumerate((vit, cnn)):
        report = alignscope.analyze(model, transforms=["rot90", "translate16,0"], images=images, input_size=(3, 224, 224),
                                    batch_size=2)
        report.save(tmp_path / f"run{index}", plots=False)
        paths.append(str(tmp_path / f"run{index}" / "alignment.csv"))
    assert _cli("compare", *paths, "--out", str(tmp_path / "both")) == 0
    combined = pd.read_csv(tmp_path / "both" / "comparison.csv")
    assert set(combined["model"]) == {"VisionTransformer", "Sequential"}
    vit_rows = combined[(combined["model"] == "VisionTransformer") & (combined["kind"] == "layer")]
    assert set(vit_rows["layer"]) == {"blocks.0", "blocks.1"} and (vit_rows["stride"] == 16).all()
    # the ViT has a classifier head, the CNN's output is a map: only the ViT gets an output row
    outputs = combined[combined["kind"] == "output"]
    assert list(outputs["model"]) == ["VisionTransformer"] * 2


def test_token_grid_and_grid_fits():
    assert token_grid(196, (224, 224)) == (14, 14)
    assert token_grid(14 * 20, (224, 320)) == (14, 20)
    assert token_grid(197, (224, 224)) is None
    assert token_grid(12, (224, 224), patch_grid=(3, 4)) == (3, 4)
    assert grid_fits(149, 149, (299, 299)) and not grid_fits(197, 64, (224, 224))
    layout = Layout("NCL", grid=(2, 3), prefix=1)
    x = torch.arange(2 * 4 * 7).reshape(2, 4, 7)
    assert torch.equal(layout.to_nchw(x), x[:, :, 1:].reshape(2, 4, 2, 3))


# --- window partitions, lists, the root, dropped stages ---------------------------


class _Windows(nn.Module):
    """(B, C, H, W) -> (4 B, C, H/2, W/2): four windows stacked along the batch."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, c, h // 2, w // 2)


class _Unwindow(nn.Module):
    def forward(self, x):
        b4, c, h, w = x.shape
        return x.reshape(b4 // 4, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b4 // 4, c, 2 * h, 2 * w)


def test_window_partitioned_layer_is_skipped_with_its_reason():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _Windows(), nn.Conv2d(4, 4, 1), _Unwindow()).eval()
    probed = {l.name: l for l in probe_layers(net, (3, 16, 16))}
    for name in ("1", "2"):
        assert not probed[name].spatial and probed[name].reason.startswith("window-partitioned")
    chosen, skipped = select_layers(list(probed.values()), "all")
    assert [l.name for l in chosen] == ["0", "3"]
    assert {"1", "2"} <= {l.name for l in skipped}
    with pytest.raises(LayerError, match="window-partitioned"):
        select_layers(list(probed.values()), ["2"])


class _TwoScales(nn.Module):
    def __init__(self):
        super().__init__()
        self.fine, self.coarse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return [self.fine(x), self.coarse(x)]


class _ListStageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = _TwoScales()
        self.feature_info = [{"module": "stage", "reduction": 2, "num_chs": 6}]

    def forward(self, x):
        fine, coarse = self.stage(x)
        return fine.mean() + coarse.mean()


def test_list_output_stage_becomes_per_element_layers():
    net = _ListStageNet().eval()
    probed = probe_layers(net, (3, 16, 16))
    elements = {l.name: l for l in probed if l.module_name == "stage"}
    assert {n: (l.shape, l.stride, l.default) for n, l in elements.items()} == {
        "stage[0]": ((4, 16, 16), 1, False), "stage[1]": ((6, 8, 8), 2, True)}
    chosen, _ = select_layers(probed)
    assert [l.name for l in chosen] == ["stage[1]"]  # the element with the stage's reduction
    both, _ = select_layers(probed, ["stage"])
    assert [l.name for l in both] == ["stage[0]", "stage[1]"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), FeatureCapture(net, both) as capture:
        maps = capture(x)
    assert torch.equal(maps["stage[0]"], net.stage.fine(x)) and torch.equal(maps["stage[1]"], net.stage.coarse(x))


class _RootStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.feature_info = [{"module": "", "reduction": 1, "num_chs": 4}]

    def forward(self, x):
        return self.conv(x) * 2  # a new tensor: only the root's hook sees it


def test_root_module_can_be_a_stage():
    net = _RootStage().eval()
    chosen, skipped = select_layers(probe_layers(net, (3, 8, 8)))
    assert [(l.name, l.shape) for l in chosen] == [("", (4, 8, 8))] and skipped == []
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(_capture(net, chosen[0], x), net(x))


class _DroppedStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_info = [{"module": "conv", "reduction": 1}, {"module": "pool", "reduction": 8},
                             {"module": "stem", "reduction": 2}]

    def forward(self, x):
        return self.pool(self.conv(x))


def test_every_dropped_default_stage_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        chosen, skipped = select_layers(probe_layers(_DroppedStages().eval(), (3, 8, 8)))
    assert [l.name for l in chosen] == ["conv"]
    reasons = {l.name: l.reason for l in skipped}
    assert set(reasons) == {"pool", "stem"}
    assert "no spatial extent" in reasons["pool"] and "no module of this name" in reasons["stem"]
    assert "default stage 'pool' dropped" in caplog.text and "default stage 'stem' dropped" in caplog.text


def test_fallback_to_spatial_modules_is_said_and_capped(caplog):
    net = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(40)]).eval()
    net.feature_info = [{"module": "missing", "reduction": 1}]
    probed = probe_layers(net, (3, 8, 8))
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        chosen, skipped = select_layers(probed)
    assert len(chosen) == FALLBACK_CAP and chosen[0].name == "0" and chosen[-1].name == "39"
    assert "falling back to 16 of its 40 spatial modules" in caplog.text
    assert sum("capped" in l.reason for l in skipped) == 40 - FALLBACK_CAP and any(l.name == "missing" for l in skipped)
    everything, _ = select_layers(probed, "all")  # the capped default leaves the probe untouched
    assert len(everything) == 40


def test_capture_checks_the_probed_shape():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    layer = next(l for l in probe_layers(net, (3, 8, 8)) if l.name == "0")
    with pytest.raises(LayerError, match="probe saw"), FeatureCapture(net, [layer]) as capture:
        capture(torch.randn(2, 3, 12, 12))


# --- the command line ------------------------------------------------------------


def _cli(*args):
    from alignscope.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def test_layers_command_shows_layouts_with_the_shared_model_options(capsys):
    import io

    import pandas as pd

    assert _cli("layers", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--format", "csv") == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("name")
    assert table.loc["blocks.0", "layout"] == "tokens 1+14x14" and table.loc["blocks.0", "output"] == "192x14x14"
    assert table[table["default"]].index.tolist() == [f"blocks.{i}" for i in range(12)]
    assert _cli("layers", "resnet18", "--weights", "missing.safetensors") == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_fractional_strides_are_said(caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)).eval()  # valid conv: 19 px -> 9 cells, stride 2.111
    with caplog.at_level(logging.INFO, logger="alignscope"):
        chosen, _ = select_layers(probe_layers(net, (3, 19, 19)))
    assert chosen[0].stride == pytest.approx(19 / 9)
    assert "fractional strides at 0 (2.111)" in caplog.text
    report = alignscope.analyze(net, transforms=["translate2,0", "hflip"], images=torch.randn(2, 3, 19, 19),
                                input_size=(3, 19, 19), batch_size=2)
    exact = report.table.set_index("transform")["exact"]
    assert not exact["translate2,0"] and exact["hflip"]


class _ChannelConv(nn.Module):
    """ECA-style: a 1-D conv along the channels of a pooled map, (B, 1, C); C = 64 would factor as 8 x 8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * self.eca(y.mean((2, 3)).unsqueeze(1)).transpose(1, 2).unsqueeze(-1)


def test_sequence_that_does_not_grow_with_the_input_is_no_token_grid():
    probed = {l.name: l for l in probe_layers(_ChannelConv().eval(), (3, 16, 16))}
    assert not probed["eca"].spatial and "does not change with the input size" in probed["eca"].reason
    assert probed["conv"].spatial


class _SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_module_called_twice_is_skipped_as_ambiguous():
    probed = {l.name: l for l in probe_layers(_SharedActivation().eval(), (3, 8, 8))}
    assert not probed["act"].spatial and "runs 2 times" in probed["act"].reason
    chosen, _ = select_layers(list(probed.values()), "all")
    assert [l.name for l in chosen] == ["conv1", "conv2", ""]


def test_a_plain_module_without_feature_info_is_read_at_its_stage_ends():
    """torchvision's resnet18 has no feature_info: its default layers are the last module before each change of
    stride, the stages timm would name (relu, layer1 ... layer4), not an even spread of its 41 spatial modules."""
    import torchvision

    from alignscope.model.capture import default_layer_rule

    probed = probe_layers(torchvision.models.resnet18().eval(), (3, 64, 64))
    chosen, _ = select_layers(probed)
    assert [layer.name for layer in chosen] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [layer.stride for layer in chosen] == [2, 4, 8, 16, 32]
    assert default_layer_rule(probed).startswith("stage ends")
