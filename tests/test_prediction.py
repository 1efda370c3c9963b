"""The output row: top-1 agreement and softmax KL between x and g x, with answers known by construction."""
import json
import logging
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alignscope
from alignscope.cli.main import main
from alignscope.errors import UsageError
from alignscope.measure.metrics import AlignmentStatistic, wilson_interval
from alignscope.measure.prediction import find_head, prediction_values
from alignscope.report.output_rows import is_output_row, layer_rows, output_rows

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cli(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def run(net, transforms, images, layers=None, **kw):
    torch.manual_seed(0)
    return alignscope.analyze(net.eval(), transforms=transforms, images=images, layers=layers,
                              input_size=tuple(images.shape[1:]), mean=MEAN, std=STD, batch_size=4, **kw)


class BrightestThird(nn.Module):
    """Class scores: ``scale`` times the one-hot of the brightest vertical third (left, middle, right) of the image.

    Under hflip left and right swap and the middle stays: the top-1 class is kept exactly for the images
    whose middle third is the brightest.
    """

    def __init__(self, scale: float = 4.0) -> None:
        super().__init__()
        self.features = nn.AvgPool2d(1)  # a spatial layer for the layer rows
        self.scale = scale

    def forward(self, x):
        m = self.features(x).mean(dim=1)
        width = m.shape[-1]
        third = width // 3
        parts = (m[..., :third], m[..., third:width - third], m[..., width - third:])
        brightest = torch.stack([p.mean(dim=(1, 2)) for p in parts], dim=1).argmax(dim=1)
        return self.scale * F.one_hot(brightest, 3).to(x.dtype)


def third_images(classes, size=64, seed=0):
    """Noise images with a bright band in the third given by each class (0 left, 1 middle, 2 right)."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(len(classes), 3, size, size, generator=generator)
    third = size // 3
    bounds = ((0, third), (third, size - third), (size - third, size))
    for i, c in enumerate(classes):
        images[i, :, :, bounds[c][0]:bounds[c][1]] += 2.0
    return images


class IsotropicPool(nn.Module):
    """Rot90-symmetric 5x5 filters (each the mean of its four quarter turns), ReLU, global average pooling, linear.

    Its output is invariant to rot90 by construction (up to float summation order); with ``symmetric=False``
    the same random filters keep their orientation.
    """

    def __init__(self, symmetric: bool = True, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 5, padding=2, bias=False)
        if symmetric:
            with torch.no_grad():
                w = self.conv.weight
                w.copy_(sum(torch.rot90(w, k, dims=(-2, -1)) for k in range(4)) / 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


# --- the per-image measures and the interval -------------------------------------------------------------


def test_kl_direction_units_and_agreement_by_hand():
    reference = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    moved = torch.tensor([[math.log(3.0), 0.0], [0.0, 1.0]], dtype=torch.float64)
    values = prediction_values(reference, moved, other=reference, roundtrip=None)
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p || q) = ln(4/3) / 2 nats (KL(q || p) would be 0.1308)
    assert values["prediction_kl"][0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    assert values["prediction_kl"][1].item() == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-12)
    # image 0: a tie in p is resolved like argmax (index 0), q's top-1 is 0 too; image 1: 0 against 1
    assert values["prediction_agreement"].tolist() == [1.0, 0.0]
    assert values["prediction_agreement_chance"].tolist() == [1.0, 1.0]
    assert values["prediction_kl_chance"].tolist() == [0.0, 0.0]
    assert values["prediction_agreement_floor"].tolist() == [1.0, 1.0]  # exact g: no round trip
    assert all(v.dtype == torch.float64 for v in values.values())


def test_non_finite_scores_are_nan_and_shapes_are_checked():
    reference = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    values = prediction_values(reference, reference.clone(), reference.clone())
    assert values["prediction_agreement"][0].item() == 1.0 and math.isnan(values["prediction_agreement"][1].item())
    assert math.isnan(values["prediction_kl"][1].item())
    with pytest.raises(ValueError, match="reference's shape"):
        prediction_values(reference, torch.zeros(2, 3), reference)


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    low, high = wilson_interval(8, 8)
    assert low == pytest.approx(8 / (8 + 1.959963984540054**2), abs=1e-12) and high == 1.0
    assert wilson_interval(0, 8)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_statistic_uses_wilson_for_proportions_and_student_t_otherwise():
    stat = AlignmentStatistic(("agree", "kl"), proportions=("agree",))
    stat.update({"agree": torch.tensor([1.0, 1.0, 0.0, 1.0]), "kl": torch.tensor([0.0, 0.0, 2.0, 0.0])})
    result = stat.compute()
    assert result["agree"] == 0.75
    assert (result["agree_ci_low"], result["agree_ci_high"]) == pytest.approx(wilson_interval(3, 4))
    half = 3.182446305 * math.sqrt(1.0) / 2  # t(3) * sample std 1 / sqrt(4)
    assert (result["kl_ci_low"], result["kl_ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    with pytest.raises(ValueError, match="not among the quantities"):
        AlignmentStatistic(("kl",), proportions=("agree",))


# --- known answers through analyze() ---------------------------------------------------------------------


def test_identity_agrees_exactly_and_the_row_comes_last(photo_tensor):
    report = run(IsotropicPool(), ["identity", "hflip"], photo_tensor, layers=["act"], per_image=True)
    table = report.table
    out = output_rows(table).set_index("transform")
    assert list(table["kind"]) == ["layer", "layer", "output", "output"]
    assert (out["depth"] == 2).all() and (out["layer"] == "output").all() and (out["channels"] == 5).all()
    assert out.loc["identity", "prediction_agreement"] == 1.0 and out.loc["identity", "prediction_kl"] == 0.0
    n = len(photo_tensor)
    assert out.loc["identity", "n_images"] == n
    assert out.loc["identity", "prediction_agreement_ci_low"] == pytest.approx(wilson_interval(n, n)[0])
    assert report.meta["output"]["measured"] is True and report.meta["output"]["classes"] == 5
    assert layer_rows(table)["prediction_agreement"].isna().all()
    per_image = report.per_image
    rows = per_image[(per_image["layer"] == "output") & (per_image["transform"] == "identity")]
    assert len(rows) == n and (rows["prediction_agreement"] == 1.0).all() and (rows["prediction_kl"] == 0.0).all()


def test_rot90_invariant_model_agrees_and_an_oriented_one_changes(photo_tensor):
    invariant = output_rows(run(IsotropicPool(symmetric=True), ["rot90"], photo_tensor, layers=["act"]).table).iloc[0]
    oriented = output_rows(run(IsotropicPool(symmetric=False), ["rot90"], photo_tensor, layers=["act"]).table).iloc[0]
    assert invariant["prediction_agreement"] == 1.0
    assert invariant["prediction_kl"] < 1e-9
    assert oriented["prediction_kl"] > 1e3 * max(invariant["prediction_kl"], 1e-12)


def test_hflip_agreement_of_the_brightest_third_is_the_share_of_middle_images():
    classes = [1, 0, 1, 2, 1, 0, 2, 1, 0, 1, 2, 1]  # 6 of 12 middle: hflip keeps exactly those
    images = third_images(classes)
    scale = 4.0
    report = run(BrightestThird(scale), ["identity", "hflip"], images, layers=["features"])
    row = output_rows(report.table).set_index("transform").loc["hflip"]
    kept = sum(c == 1 for c in classes) / len(classes)
    assert row["prediction_agreement"] == pytest.approx(kept, abs=1e-12)
    # one-hot scores s e_i: p = (a at i, b elsewhere); KL between two different ones is (a - b) s
    a, b = math.exp(scale) / (math.exp(scale) + 2), 1 / (math.exp(scale) + 2)
    assert row["prediction_kl"] == pytest.approx((1 - kept) * (a - b) * scale, rel=1e-9)
    assert (row["prediction_agreement_ci_low"], row["prediction_agreement_ci_high"]) == pytest.approx(wilson_interval(6, 12))
    # chance: image i against image i-1 (image 0 against image 1), in the tensor's order
    partners = [1] + list(range(len(classes) - 1))
    chance = sum(classes[i] == classes[p] for i, p in enumerate(partners)) / len(classes)
    assert row["prediction_agreement_chance"] == pytest.approx(chance, abs=1e-12)
    assert row["prediction_agreement_floor"] == 1.0 and row["prediction_kl_floor"] == 0.0  # hflip is exact
    verdict = [v for v in report.verdicts() if v.startswith("hflip prediction")]
    assert verdict and "changes for 50.0% of images under hflip (6 of 12" in verdict[0]


def test_no_output_removes_the_rows_and_stops_the_forward_early(photo_tensor):
    batches = []  # batch sizes reaching the head: set-up probes use 1 or 2 images, the analysis 4 or 5
    net = IsotropicPool()
    net.head.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    with_rows = run(net, ["hflip"], photo_tensor, layers=["act"])
    full = list(batches)
    batches.clear()
    without = run(net, ["hflip"], photo_tensor, layers=["act"], output=False)
    # the analysis's forwards run to the end only when the output is measured
    assert sum(b >= 4 for b in full) == 4 and max(batches) <= 2
    assert is_output_row(with_rows.table).sum() == 1
    assert not is_output_row(without.table).any() and "prediction_agreement" not in without.table
    assert without.meta["output"] == {"measured": False, "classes": None, "evidence": "",
                                      "reason": "skipped on request (--no-output)"}


def test_a_headless_module_gives_no_row_and_says_why(photo_tensor, caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="alignscope"):
        report = run(net, ["hflip"], photo_tensor, layers=["1"])
    assert not is_output_row(report.table).any()
    assert report.meta["output"]["measured"] is False
    assert "(2, 4, 64, 64)" in report.meta["output"]["reason"]
    assert any("no prediction row" in r.getMessage() for r in caplog.records)
    assert not any("prediction" in v for v in report.verdicts())


def test_find_head_reads_timm_num_classes():
    import timm

    features = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    assert find_head(features, (3, 32, 32)).measured is False
    assert "num_classes = 0" in find_head(features, (3, 32, 32)).reason
    head = find_head(classifier, (3, 32, 32))
    assert head.measured and head.classes == 7 and "timm" in head.evidence
    single = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    assert "at least 2 classes" in find_head(single, (3, 4, 4)).reason


# --- table, gate, page and figures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def third_report(tmp_path_factory):
    classes = [1, 0, 1, 2, 1, 0, 2, 1]
    report = run(BrightestThird(), ["identity", "hflip", "translate8,0"], third_images(classes), layers=["features"])
    out = tmp_path_factory.mktemp("pred") / "report"
    report.save(out)
    return report, out


def test_gate_limits_prediction_columns_on_output_rows_only(third_report, capsys):
    report, out = third_report
    failing = report.check(min={"prediction_agreement": 0.9})
    rows = output_rows(report.table)
    assert list(failing["transform"]) == list(rows.loc[rows["prediction_agreement"] < 0.9, "transform"])
    assert "hflip" in list(failing["transform"]) and (failing["kind"] == "output").all()  # hflip: 4 of 8 kept
    assert failing["breaks"].iloc[0] == f"prediction_agreement {failing['prediction_agreement'].iloc[0]:.4g} < 0.9"
    # layer limits ignore the output rows' empty distances (NaN there would otherwise break every gate)
    assert report.check(max={"aligned_error": 10}).empty
    csv = str(out / "alignment.csv")
    capsys.readouterr()
    assert cli("check", csv, "--min", "prediction_agreement=0.9", "--transforms", "hflip") == 1
    printed = capsys.readouterr().out
    assert "hflip" in printed and "prediction_agreement" in printed and "0.5 < 0.9" in printed
    # the count is of the rows a limit applies to: hflip has one output row and one layer row
    assert cli("check", csv, "--min", "prediction_agreement=0.9", "--transforms", "hflip") == 1
    assert "1 of 1 checked rows break the limits" in capsys.readouterr().err
    assert cli("check", csv, "--max", "aligned_error=10", "--transforms", "hflip") == 0
    assert "the checked row is within the limits" in capsys.readouterr().err
    assert cli("check", csv, "--min", "prediction_agreement=0.4", "--max", "aligned_error=10", "--transforms", "hflip") == 0
    assert "all 2 checked rows are within the limits" in capsys.readouterr().err
    assert cli("check", csv, "--min", "prediction_agreement=0.9", "--transforms", "identity") == 0
    assert cli("check", csv, "--min", "prediction_agreement=0.9", "--layers", "features") == 2
    with pytest.raises(UsageError, match="output rows"):
        report.check(min={"prediction_agreement": 0.9}, layers=["features"])


def test_csv_page_and_figures_carry_the_row(third_report):
    report, out = third_report
    table = pd.read_csv(out / "alignment.csv")
    assert list(table.loc[table["kind"] == "output", "transform"]) == ["identity", "hflip", "translate8,0"]
    assert table.loc[table["kind"] == "layer", "channels"].dtype.kind == "i"  # integer columns stay integers
    page = (out / "report.html").read_text()
    assert "Prediction (the model&#x27;s output)" in page or "Prediction (the model's output)" in page
    assert page.count("prediction_agreement_chance") >= 2  # the prediction table and the full table
    assert (out / "prediction.png").is_file()
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["output"]["measured"] is True
    assert any("hflip prediction" in v for v in run_json["verdicts"])
    figures = report.plot()
    depth_ticks = [t.get_text() for ax in figures["alignment_by_depth"].axes for t in ax.get_xticklabels()]
    assert "output" not in depth_ticks and "features" in depth_ticks
    agreement_ax = figures["prediction"].axes[0]
    assert [t.get_text() for t in agreement_ax.get_yticklabels()] == ["hflip", "translate8,0"]
    shown = sorted(float(x) for x in agreement_ax.containers[0].lines[0].get_xdata())
    expected = output_rows(report.table).set_index("transform").loc[["hflip", "translate8,0"], "prediction_agreement"]
    assert shown == pytest.approx(sorted(expected))
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)


def test_cli_no_output_flag(tmp_path):
    common = ("analyze", "--model", "resnet18", "--no-pretrained", "--max-images", "2", "--batch-size", "2",
              "--transform", "hflip", "--layers", "layer1", "--no-plots", "--quiet")
    assert cli(*common, "--out", str(tmp_path / "with")) == 0
    assert cli(*common, "--no-output", "--out", str(tmp_path / "without")) == 0
    with_rows = pd.read_csv(tmp_path / "with" / "alignment.csv")
    without = pd.read_csv(tmp_path / "without" / "alignment.csv")
    assert list(with_rows["kind"]) == ["layer", "output"] and with_rows["channels"].iloc[1] == 1000
    assert list(without["kind"]) == ["layer"]
    assert json.loads((tmp_path / "without" / "run.json").read_text())["output"]["measured"] is False
