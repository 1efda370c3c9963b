import logging

import pandas as pd
import pytest
import torch
from torch import nn

import alignscope
from alignscope.errors import ImageError
from alignscope.report.caveats import collapsed_layers


def test_collapsed_layers_compares_chance_with_the_map_scale():
    table = pd.DataFrame({"layer": ["a", "a", "b"], "chance_distance": [1e-6, 2.0, 1e-6], "reference_norm": [10.0, 10.0, 1e-4]})
    # a: one transform's chance is 1e-7 of the map norm; b: tiny maps, but chance is 1% of them
    assert collapsed_layers(table) == [("a", 1e-7)]
    assert collapsed_layers(table.drop(columns="reference_norm")) == []


class _NearlyConstant(nn.Module):
    """A conv whose output is a large constant plus a tiny image-dependent part."""

    def __init__(self, scale):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(scale)
            self.conv.bias.fill_(100.0)

    def forward(self, x):
        return self.conv(x)


def _warnings(caplog, scale):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        report = alignscope.analyze(_NearlyConstant(scale), transforms=["hflip"], images=torch.randn(4, 3, 16, 16),
                                    input_size=(3, 16, 16), batch_size=4)
    return report, caplog.text


def test_chance_collapse_is_warned_only_when_chance_vanishes(caplog):
    torch.manual_seed(0)
    report, text = _warnings(caplog, 1e-4)  # the image's part of the maps: a few float32 steps of the constant 100
    assert "chance distance collapsed at 1 layer(s): conv" in text
    assert (report.table["chance_distance"] / report.table["reference_norm"]).max() < 1e-3
    _, text = _warnings(caplog, 1.0)
    assert "chance distance collapsed" not in text


def test_identical_images_are_named_as_such_not_blamed_on_the_weights(caplog):
    torch.manual_seed(0)
    image = torch.randn(1, 3, 16, 16)
    caplog.clear()
    with pytest.raises(ImageError, match="copies of one image") as refused:
        alignscope.analyze(_NearlyConstant(1.0), transforms=["hflip"], images=image.repeat(3, 1, 1, 1),
                           input_size=(3, 16, 16), batch_size=4)
    assert "weights" not in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="alignscope"):  # two copies among distinct images: named, not blamed
        report = alignscope.analyze(_NearlyConstant(1.0), transforms=["hflip"],
                                    images=torch.cat([image.repeat(2, 1, 1, 1), torch.randn(2, 3, 16, 16)]),
                                    input_size=(3, 16, 16), batch_size=4)
    assert "duplicate images" in caplog.text
    assert "random weights?" not in caplog.text
    assert any("duplicate images" in line for line in report.warnings())
