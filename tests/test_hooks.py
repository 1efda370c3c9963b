import pytest
import timm
import torch
from torch import nn

from alignscope.errors import LayerError
from alignscope.model.capture import FeatureCapture, probe_layers, select_layers


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False).eval()


def test_resnet18_stage_table(resnet18):
    chosen, _ = select_layers(probe_layers(resnet18, (3, 224, 224)))
    assert [(l.name, l.shape, l.stride) for l in chosen] == [
        ("act1", (64, 112, 112), 2), ("layer1", (64, 56, 56), 4), ("layer2", (128, 28, 28), 8),
        ("layer3", (256, 14, 14), 16), ("layer4", (512, 7, 7), 32)]


def test_lite0_stage_table():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    chosen, _ = select_layers(probe_layers(model, (3, 224, 224)))
    assert [(l.name, l.channels, l.stride) for l in chosen] == [
        ("blocks.0", 16, 2), ("blocks.1", 24, 4), ("blocks.2", 40, 8), ("blocks.4", 112, 16), ("blocks.6", 320, 32)]


def test_capture_shapes_and_early_stop(resnet18):
    probed = probe_layers(resnet18, (3, 224, 224))
    chosen, _ = select_layers(probed, ["layer1", "layer2"])
    ran = []
    handle = resnet18.layer3.register_forward_hook(lambda *a: ran.append("layer3"))
    try:
        with FeatureCapture(resnet18, chosen) as capture:
            maps = capture(torch.randn(2, 3, 224, 224))
    finally:
        handle.remove()
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"layer1": (2, 64, 56, 56), "layer2": (2, 128, 28, 28)}
    assert ran == []  # the forward pass stopped after layer2


def test_hooks_are_removed_after_an_exception(resnet18):
    chosen, _ = select_layers(probe_layers(resnet18, (3, 224, 224)), ["layer1"])
    before = len(resnet18.layer1._forward_hooks)
    with pytest.raises(RuntimeError):
        with FeatureCapture(resnet18, chosen) as capture:
            assert len(resnet18.layer1._forward_hooks) == before + 1
            capture(torch.randn(1, 5, 224, 224))  # wrong channel count
    assert len(resnet18.layer1._forward_hooks) == before


def test_selection_globs_all_and_errors(resnet18):
    probed = probe_layers(resnet18, (3, 224, 224))
    chosen, _ = select_layers(probed, "layer1.*")
    assert chosen and all(l.name.startswith("layer1.") for l in chosen)
    everything, skipped = select_layers(probed, "all")
    names = [l.name for l in everything]
    assert "layer4" in names and "fc" not in names
    assert len(names) == len(set(names))
    assert any(l.name == "global_pool" for l in skipped)
    with pytest.raises(LayerError, match="closest names: layer4, layer3"):
        select_layers(probed, ["layer9"])
    with pytest.raises(LayerError, match="no spatial output"):
        select_layers(probed, ["fc"])


def test_in_place_overwrite_is_detected_and_cloned():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    probed = probe_layers(net, (3, 16, 16))
    conv = next(l for l in probed if l.name == "0")
    assert conv.overwritten_in_place
    x = torch.randn(2, 3, 16, 16)
    with FeatureCapture(net, [conv], stop_early=False) as capture:
        maps = capture(x)
    assert (maps["0"] < 0).any()  # the conv output before the in-place ReLU
    assert torch.allclose(maps["0"], net[0](x))


def test_plain_module_without_feature_info_defaults_to_distinct_spatial_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    chosen, _ = select_layers(probe_layers(net, (3, 8, 8)))
    assert [l.name for l in chosen] == ["0", "1"]
