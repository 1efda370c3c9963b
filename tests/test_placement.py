"""Ideal-STN placement (``placement=True``): the prediction when layer k's output of g x is replaced by g⁻¹ of it.

Known answers: the identity keeps every prediction exactly; a circularly padded stride-1 CNN under a roll
by whole pixels is restored exactly at every place, though its flattening head changes its mind without
the STN; the input placement is the output row's floor; the e2cnn C8 network is restored by g⁻¹ at its
invariant fields and, at its regular fields, only with the permutation channel map.
"""
import math

import pytest
import torch
from torch import nn

import alignscope
from alignscope.errors import LayerError, UsageError
from alignscope.model.layouts import Layout
from alignscope.model.substitute import MapSubstitution
from alignscope.report.gate import check
from alignscope.report.output_rows import output_rows, placement_rows

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run(net, transforms, images, layers=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("batch_size", 4)
    return alignscope.analyze(net.eval(), transforms=transforms, images=images, layers=layers,
                              input_size=tuple(images.shape[1:]), mean=MEAN, std=STD, placement=True, **kw)


def placed(report, transform, by="inverse"):
    rows = placement_rows(report.table)
    rows = rows[(rows["transform"] == transform) & (rows["placed_by"] == by)]
    return rows.set_index("layer")


class FlatHead(nn.Module):
    """Circular stride-1 convolutions, then a linear read-out of every cell: not translation invariant."""

    def __init__(self, size: int, classes: int = 10, padding_mode: str = "circular") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, padding_mode=padding_mode)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, padding_mode=padding_mode)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6 * size * size, classes)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


@pytest.fixture()
def small_images():
    generator = torch.Generator().manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.randn(12, 3, 24, 24, generator=generator), 3, 1, 1)


def test_identity_keeps_every_prediction_exactly(small_images):
    report = run(FlatHead(24), ["identity"], small_images, layers=["act1", "act2"])
    rows = placed(report, "identity")
    assert list(rows.index) == ["input", "act1", "act2"] and list(rows["depth"]) == [0, 1, 2]
    assert (rows["placed_agreement"] == 1).all() and (rows["placed_kl"].abs() < 1e-12).all()
    assert (rows["n_images"] == 12).all()


def test_a_roll_is_undone_exactly_at_every_place_of_a_circular_cnn(small_images):
    report = run(FlatHead(24), ["roll5,-3"], small_images, layers=["act1", "act2"])
    rows = placed(report, "roll5,-3")
    assert (rows["placed_agreement"] == 1).all() and (rows["placed_kl"] < 1e-6).all()
    # without the STN the flattening head does change its mind: the rows above measure the substitution
    assert output_rows(report.table).iloc[0]["prediction_agreement"] < 0.75
    assert rows.loc["act2", "placement_drop"] == 0


def test_the_global_pooling_head_of_the_issue_keeps_agreement_one(small_images):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    report = run(net, ["roll7,2"], small_images, layers=["1", "3"])
    rows = placed(report, "roll7,2")
    assert (rows["placed_agreement"] == 1).all() and (rows["placed_kl"] < 1e-6).all()


def test_zero_padding_makes_the_stn_at_a_layer_imperfect_but_not_at_the_input(small_images):
    # rot90 of a square image is exact for the input, so the input placement is f(x); zero-padded
    # convolutions are not equivariant at the border only, so the layers keep most predictions
    report = run(FlatHead(24, padding_mode="zeros"), ["rot90", "hflip"], small_images, layers=["act1", "act2"])
    for transform in ("rot90", "hflip"):
        rows = placed(report, transform)
        assert rows.loc["input", "placed_agreement"] == 1 and rows.loc["input", "placed_kl"] == 0
        assert (rows.loc[["act1", "act2"], "placed_kl"] > 0).all()


def test_the_input_placement_is_the_output_rows_floor(small_images):
    report = run(FlatHead(24), ["rotate30", "scale0.9", "translate3,0"], small_images, layers=["act2"])
    outputs = output_rows(report.table).set_index("transform")
    for transform in ("rotate30", "scale0.9"):  # resampling transforms: the measuring pass's own round trip
        row = placed(report, transform).loc["input"]
        assert row["placed_agreement"] == pytest.approx(outputs.loc[transform, "prediction_agreement_floor"], abs=1e-6)
        assert row["placed_kl"] == pytest.approx(outputs.loc[transform, "prediction_kl_floor"], abs=1e-6)
    # a translation with zero fill loses its border: the input STN is the real round trip, not f(x)
    assert placed(report, "translate3,0").loc["input", "placed_kl"] > 0


def test_numbers_do_not_depend_on_the_batch_size(small_images):
    columns = ["placed_agreement", "placed_kl", "placed_kl_ci_low", "placement_drop"]
    one = placement_rows(run(FlatHead(24), ["rotate30", "hflip"], small_images, layers=["act1"], batch_size=5).table)
    two = placement_rows(run(FlatHead(24), ["rotate30", "hflip"], small_images, layers=["act1"], batch_size=12).table)
    # float32 convolutions may round differently with the batch size (oneDNN picks kernels by shape): 1e-7
    # relative; a statistic weighted or reset per batch would differ by far more
    assert one[columns].to_numpy() == pytest.approx(two[columns].to_numpy(), rel=1e-6, abs=1e-9, nan_ok=True)


def test_placement_is_a_gate_column_and_a_usage_error_without_a_head(small_images):
    report = run(FlatHead(24, padding_mode="zeros"), ["rot90"], small_images, layers=["act1", "act2"])
    failing = check(report.table, min={"placed_agreement": 1.01})
    assert set(failing["kind"]) == {"placement"} and len(failing) == 3
    assert check(report.table, min={"placed_agreement": 0.0}).empty
    assert check(report.table, max={"placement_drop": 1.0}).empty  # the input rows, without a place before, are not checked
    with pytest.raises(UsageError, match="needs the output row"):
        run(FlatHead(24), ["rot90"], small_images, layers=["act1"], output=False)
    with pytest.raises(UsageError, match="placement compares the model's predictions"):
        run(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), ["rot90"], small_images, layers=["1"])


class Twice(nn.Module):
    """One ReLU module used twice: no single tensor to replace."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.mid = nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv2(self.mid(self.act(self.conv1(x)))))
        return self.head(h.mean(dim=(2, 3)))


def test_a_module_that_runs_twice_has_no_single_tensor_to_replace(small_images):
    from alignscope.model.capture import LayerInfo

    net = Twice().eval()  # the probe leaves such a module out of the layers; the substitution refuses it too
    layer = LayerInfo(name="act", module_type="ReLU", order=0, spatial=True, shape=(4, 24, 24), stride=1.0)
    with MapSubstitution(net, [layer]) as substitution, pytest.raises(LayerError, match="ran 2 times"):
        with substitution.replacing(layer, torch.zeros(2, 4, 24, 24)), torch.inference_mode():
            net(small_images[:2])
    report = run(net, ["rot90"], small_images, layers=["mid"])
    assert placed(report, "rot90").loc["mid", "placed_agreement"] >= 0


@pytest.mark.parametrize("kind, shape, prefix", [("NCHW", (2, 5, 3, 4), 0), ("NHWC", (2, 3, 4, 5), 0),
                                                 ("NLC", (2, 2 + 12, 5), 2), ("NCL", (2, 5, 1 + 12), 1)])
def test_every_layout_is_written_back_as_it_was_read(kind, shape, prefix):
    captured = torch.randn(*shape)
    layout = Layout(kind, grid=(3, 4) if kind in ("NLC", "NCL") else None, prefix=prefix)
    nchw = layout.to_nchw(captured)
    assert tuple(nchw.shape) == (2, 5, 3, 4)
    back = layout.from_nchw(nchw, captured)
    assert torch.equal(back, captured) and back.data_ptr() != captured.data_ptr()
    changed = layout.from_nchw(nchw + 1, captured)
    assert torch.equal(layout.to_nchw(changed), nchw + 1)
    if prefix:  # the class / distillation tokens are kept as they were
        kept = changed[:, :prefix] if kind == "NLC" else changed[:, :, :prefix]
        assert torch.equal(kept, captured[:, :prefix] if kind == "NLC" else captured[:, :, :prefix])


def test_a_substitute_of_the_wrong_shape_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    from alignscope.model.capture import probe_layers

    layer = next(info for info in probe_layers(net, (3, 8, 8)) if info.name == "1")
    with MapSubstitution(net, [layer]) as substitution, pytest.raises(LayerError, match="must be"):
        with substitution.replacing(layer, torch.zeros(1, 3, 8, 8)):
            pass


def test_a_vit_token_grid_is_written_back_behind_its_class_token():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False).eval()  # random weights
    images = torch.randn(2, 3, 224, 224)
    report = alignscope.analyze(vit, transforms=["identity", "translate16,0"], images=images, layers=["blocks.0", "blocks.1"],
                                input_size=(3, 224, 224), batch_size=2, placement=True)
    rows = placed(report, "identity")
    assert (rows["placed_agreement"] == 1).all() and (rows["placed_kl"].abs() < 1e-9).all()
    assert placed(report, "translate16,0")["placed_kl"].notna().all()


@pytest.fixture(scope="module")
def c8_reports():
    pytest.importorskip("e2cnn")
    from alignscope.model.reference_nets import C8Classifier

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.randn(16, 3, 32, 32, generator=generator), 3, 1, 1)
    reports = {}
    for reads in ("pooled", "regular"):
        reports[reads] = alignscope.analyze(C8Classifier(reads=reads, size=32).eval(), transforms=["rot90"], images=images,
                                            layers=[f"body.{reads}"], input_size=(3, 32, 32),
                                            batch_size=4, channel_map="permutation", placement=True)
    return reports


def test_c8_invariant_fields_are_restored_by_the_inverse_warp_alone(c8_reports):
    rows = placed(c8_reports["pooled"], "rot90")
    assert rows.loc["body.pooled", "placed_agreement"] == 1 and rows.loc["body.pooled", "placed_kl"] < 1e-6
    assert output_rows(c8_reports["pooled"].table).iloc[0]["prediction_agreement"] < 0.9  # the head is not invariant


def test_c8_regular_fields_need_the_permutation_channel_map(c8_reports):
    report = c8_reports["regular"]
    assert placed(report, "rot90").loc["body.regular", "placed_agreement"] < 0.9
    mapped = placed(report, "rot90", by="permutation").loc["body.regular"]
    assert mapped["placed_agreement"] == 1 and mapped["placed_kl"] < 1e-6


def test_before_a_pointwise_tail_and_global_pooling_an_exact_warp_changes_nothing(small_images):
    # 1x1 convolutions and a global mean cannot tell where a cell sits: rotating the last map back by a
    # quarter turn (a permutation of its cells) gives exactly the prediction of g x, no better
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    report = run(net, ["rot90"], small_images, layers=["1"])
    last = placed(report, "rot90").loc["1"]
    output = output_rows(report.table).iloc[0]
    assert last["placed_agreement"] == output["prediction_agreement"]
    assert last["placed_kl"] == pytest.approx(output["prediction_kl"], abs=1e-6)


def test_registered_rows_only_where_g_is_interpolated_on_a_lattice(small_images):
    report = run(FlatHead(24, padding_mode="zeros"), ["rotate30", "rot90"], small_images, layers=["act1", "act2"])
    assert "registered" in report.meta["placement"]["placed_by"]
    rows = placement_rows(report.table)
    registered = rows[rows["placed_by"] == "registered"]
    assert set(registered["transform"]) == {"rotate30"}  # rot90 is exact on the grid: its registered map is g⁻¹ itself
    assert set(registered["layer"]) == {"act1", "act2"} and registered["placed_agreement"].between(0, 1).all()


def test_the_placement_figures_have_a_panel_per_transform_with_the_no_stn_line(small_images):
    import matplotlib.pyplot as plt

    report = run(FlatHead(24, padding_mode="zeros"), ["identity", "rot90", "hflip"], small_images, layers=["act1", "act2"])
    figures = report.plot()
    try:
        assert {"placement", "placement_kl"} <= set(figures)
        panels = {ax.get_title(): ax for ax in figures["placement"].axes if ax.get_visible() and ax.get_title()}
        assert set(panels) == {"rot90", "hflip"}  # the identity, a control, is left out
        none = output_rows(report.table).set_index("transform")["prediction_agreement"]
        for transform, ax in panels.items():
            line = next(l for l in ax.get_lines() if l.get_marker() == "o")
            expected = placed(report, transform).sort_values("depth")["placed_agreement"].to_numpy()
            assert list(line.get_ydata()) == pytest.approx(list(expected))
            dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
            assert dashed and dashed[0].get_ydata()[0] == pytest.approx(none[transform])
    finally:
        plt.close("all")
