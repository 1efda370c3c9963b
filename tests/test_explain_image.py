"""explain draws a chosen image: the one with the most structure at the layer, or the one named; with colour bars."""
import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image
from torch import nn

from alignscope.errors import UsageError
from alignscope.explain import explain


class Identity(nn.Module):
    """A 1x1 convolution that copies its input: the layer's map is the image itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])

    def forward(self, x):
        return self.conv(x)


def _images():
    """Six images of faint speckle; image 4 also holds a large smooth blob (the most structure by construction)."""
    torch.manual_seed(0)
    images = 0.3 * torch.randn(6, 3, 24, 24)  # cell-to-cell speckle: large raw variance, little after smoothing
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    images[4] = 0.05 * torch.randn(3, 24, 24) + torch.exp(-((xx - 8) ** 2 + (yy - 12) ** 2) / 30.0)
    return images


def _run(**kwargs):
    return explain(Identity(), layer="conv", transform="hflip", images=_images(), input_size=(3, 24, 24), batch_size=3, **kwargs)


def test_default_example_is_the_image_with_most_structure():
    result = _run()
    assert result.meta["example_image"] == "tensor[4]"
    assert "most structure at conv" in result.meta["example_reason"]
    assert torch.allclose(result.example["reference"], _images()[4], atol=1e-5)  # identity layer: the map is the image


def test_named_image_is_drawn():
    result = _run(image="tensor[1]")
    assert result.meta["example_image"] == "tensor[1]"
    assert torch.allclose(result.example["reference"], _images()[1], atol=1e-5)


def test_unknown_image_is_a_usage_error_listing_the_names(tmp_path):
    for i in range(3):
        Image.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()).save(tmp_path / f"photo{i}.png")
    with pytest.raises(UsageError, match=r"image 'photo9' is not among the 3 images used \(.*photo0.png"):
        explain(Identity(), layer="conv", transform="hflip", images=str(tmp_path), input_size=(3, 24, 24), image="photo9")
    result = explain(Identity(), layer="conv", transform="hflip", images=str(tmp_path), input_size=(3, 24, 24), image="photo2")
    assert result.meta["example_image"].endswith("photo2.png")


def test_channel_grid_has_a_colour_bar_per_row():
    fig = _run().figure(top=1)
    rows = 2  # worst and best channel
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == rows and len(fig.axes) == rows * 4 + rows
    plt.close(fig)


def test_layer_number_is_the_tables_mean_of_per_image_ratios():
    import alignscope

    report = alignscope.analyze(Identity(), transforms=["rotate30"], images=_images(), input_size=(3, 24, 24),
                                layers="conv", batch_size=3)
    result = explain(Identity(), layer="conv", transform="rotate30", images=_images(), input_size=(3, 24, 24), batch_size=3)
    row = report.table[report.table["transform"] == "rotate30"].iloc[0]
    assert result.meta["layer_aligned_error"] == pytest.approx(row["aligned_error"], rel=1e-6)
    # the pooled ratio of sums is another number (images weigh by their chance distance), kept under its own name
    assert result.meta["layer_aligned_error_pooled"] != pytest.approx(row["aligned_error"], rel=1e-3)
