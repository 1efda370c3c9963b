"""The localization-depth sweep: variant ranges, k up to the classifier's depth, stability, learning curves."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from alignscope.errors import UsageError
from alignscope.stn import STNClassifier, TrainConfig, load_data, run_experiment, spatial_transform, train_variant
from alignscope.stn.angles import NO_COMPENSATION_STD
from alignscope.stn.evaluate import CurveProbe
from alignscope.stn.experiment import STNExperiment
from alignscope.stn.saved import load_experiment
from alignscope.stn.models import DEFAULT_VARIANTS, depth_sweep_variants, expand_variants, variant_depth
from alignscope.stn.stability import COLLAPSE_ANGLE_DEG, run_stability, stability_summary

TINY = TrainConfig(optimizer="adam", lr=3e-3, iterations=6, batch_size=16)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", data_seed=0)


def test_variant_ranges_expand_in_order():
    assert expand_variants("none,input,deep@1..3,shared@2..4", "narrow") == [
        "none", "input", "deep@1", "deep@2", "deep@3", "shared@2", "shared@3", "shared@4"]
    assert expand_variants("deep@2..2", "small") == ["deep@2"]
    assert expand_variants("default", "narrow") == list(DEFAULT_VARIANTS)
    assert expand_variants("depth-sweep", "narrow") == list(depth_sweep_variants("narrow")) == [
        "none", "input", "shared@1", "shared@2", "shared@3", "shared@4", "deep@1", "deep@2", "deep@3", "deep@4"]
    assert expand_variants("depth-sweep", "classic") == ["none", "input", "shared@1", "deep@1"]
    assert "supervised" in expand_variants("all", "narrow")


@pytest.mark.parametrize("spec,message", [
    ("deep@3..1", "runs backwards"),
    ("deep@1..5", "does not fit"),  # narrow has 4 layers
    ("deep@1..2,deep@2", "more than once"),
    (" , ", "names no variant"),
    ("shared@0", "does not fit"),
    ("deep@1..", "unknown variant"),
    ("deep@a..b", "unknown variant"),
    ("foo", "unknown variant"),
])
def test_bad_variant_lists_are_refused_with_the_reason(spec, message):
    with pytest.raises(UsageError, match=message):
        expand_variants(spec, "narrow")


def test_variant_depth():
    assert [variant_depth(v) for v in ("none", "input", "shared@3", "deep@4", "features@1", "supervised")] == [
        None, 0, 3, 4, 1, None]


@pytest.mark.parametrize("variant", ["shared@4", "deep@4", "features@4"])
def test_the_localization_net_reads_the_last_layer(variant, digits):
    """k = 4 reads the 4 x 4 map of the last layer; the STN starts as the identity and the deep copy has 4 layers."""
    torch.manual_seed(0)
    model = STNClassifier(variant, classifier="narrow").eval()
    x = digits.test_images[:3]
    assert model._localization_input(x).shape[-2:] == (4, 4)
    theta = model.predict_theta(x)
    torch.testing.assert_close(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3), atol=1e-6, rtol=0)
    assert model(x).shape == (3, 10)
    if variant.startswith("deep"):
        assert len(model.loc_layers) == 4


def test_a_non_finite_sampling_matrix_stops_the_transform():
    """grid_sample returns finite values for NaN coordinates: the check is what makes such a warp visible."""
    theta = torch.tensor([[[1.0, 0, 0], [0, float("nan"), 0]]])
    with pytest.raises(FloatingPointError, match="sampling matrix"):
        spatial_transform(torch.rand(1, 1, 8, 8), theta)


def test_a_diverging_run_is_recorded_not_raised(digits):
    config = TrainConfig(optimizer="sgd", lr=1e12, iterations=20, batch_size=16)
    result = train_variant("input", digits.train_images, digits.train_labels, config=config, classifier="narrow")
    assert result.diverged_at is not None and result.diverged_at < 20
    assert len(result.losses) == result.diverged_at and not math.isfinite(result.losses[-1])
    lines = []
    experiment = run_experiment(digits, variants=("input", "none"), seeds=1, config=config, test_passes=1, log=lines.append)
    row = experiment.results.set_index("variant").loc["input"]
    assert bool(row["diverged"]) and row["collapsed"] is False and math.isnan(row["test_accuracy"])
    assert any(line.startswith("input seed 0: DIVERGED") for line in lines)
    summary = experiment.summary().set_index("variant")
    assert summary.loc["input", "diverged_fraction"] == 1.0


@pytest.mark.parametrize("variant,accuracy,angle,diverged_at,expected", [
    ("input", 0.95, 12.0, None, (False, False)),
    ("input", 0.95, COLLAPSE_ANGLE_DEG - 0.01, None, (False, False)),
    ("input", 0.95, COLLAPSE_ANGLE_DEG, None, (False, True)),
    ("input", 0.95, math.nan, None, (False, True)),  # no angle read: not counted as a working warp
    ("deep@4", 0.20, 12.0, None, (True, False)),  # twice chance for 10 classes: the classifier stopped learning
    ("deep@4", 0.21, 12.0, None, (False, False)),
    ("shared@2", math.nan, math.nan, 7, (True, False)),
    ("none", 0.97, NO_COMPENSATION_STD, None, (False, None)),
    ("supervised", math.nan, 4.0, None, (False, None)),  # the control has no accuracy, and that is not a failure
])
def test_stability_definitions(variant, accuracy, angle, diverged_at, expected):
    found = run_stability(variant, accuracy, angle, diverged_at, n_classes=10)
    assert (found["diverged"], found["collapsed"]) == expected


def test_the_worst_seed_and_the_fractions():
    rows = [("deep@2", 0, 0.97, 14.0, False, False), ("deep@2", 1, 0.96, 50.0, False, True),
            ("deep@2", 2, math.nan, math.nan, True, False), ("shared@2", 0, 0.97, 20.0, False, False),
            ("shared@2", 1, 0.95, 25.0, False, False), ("none", 0, 0.90, 52.0, False, None),
            ("none", 1, 0.80, 52.0, False, None)]
    results = pd.DataFrame(rows, columns=["variant", "seed", "test_accuracy", "angle_std_deg", "diverged", "collapsed"])
    table = stability_summary(results)
    assert table.loc["deep@2", "worst_seed"] == 2  # diverged beats any angle
    assert table.loc["deep@2", "diverged_fraction"] == pytest.approx(1 / 3)
    assert table.loc["deep@2", "collapsed_fraction"] == pytest.approx(1 / 3)
    assert table.loc["shared@2", "worst_seed"] == 1 and table.loc["shared@2", "angle_std_deg_worst"] == 25.0
    assert table.loc["none", "worst_seed"] == 1  # equal angles: the lower accuracy
    assert math.isnan(table.loc["none", "collapsed_fraction"])


def test_the_learning_curve_does_not_change_the_training(digits):
    """The probe evaluates in eval mode and draws no random numbers: same losses with and without it."""
    config = TrainConfig(optimizer="adam", lr=3e-3, iterations=9, batch_size=16)
    plain = train_variant("deep@2", digits.train_images, digits.train_labels, config=config, classifier="narrow")
    from alignscope.stn import FixedTestSet

    test = FixedTestSet.make(digits.test_images, digits.test_labels, "rotate", 1, seed=3)
    probe = CurveProbe(test, size=200)
    probed = train_variant("deep@2", digits.train_images, digits.train_labels, config=config, classifier="narrow",
                           checkpoint=probe, checkpoint_every=4)
    assert probed.losses == plain.losses
    assert [r["step"] for r in probe.rows] == [0, 4, 8, 9]
    assert probed.model.state_dict().keys() == plain.model.state_dict().keys()
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(probed.model.state_dict()[name], value, atol=0, rtol=0)
    # at step 0 the STN is the identity: the probe's angle std is that of no compensation on these 200 digits
    from alignscope.stn import angle_metrics

    params = test.params[0, :200]
    expected = angle_metrics(params, torch.zeros_like(params), test.labels[:200])["angle_std_deg"]
    assert probe.rows[0]["probe_angle_std_deg"] == pytest.approx(expected, abs=1e-6)
    assert math.isnan(probe.rows[0]["train_loss"])
    assert probe.rows[1]["train_loss"] == pytest.approx(sum(plain.losses[:4]) / 4)
    assert probe.rows[3]["train_loss"] == pytest.approx(plain.losses[8])


def test_a_depth_sweep_writes_curves_a_depth_figure_and_answers(digits, tmp_path):
    experiment = run_experiment(digits, variants=expand_variants("none,input,shared@1..2,deep@1..2", "narrow"), seeds=2,
                                config=TINY, test_passes=1)
    curves = experiment.curves
    assert set(curves["variant"]) == {"none", "input", "shared@1", "shared@2", "deep@1", "deep@2"}
    assert sorted(curves["step"].unique()) == list(range(TINY.iterations + 1))  # 6 steps: a point at every step
    assert {"stn_depth", "stn_curves"} <= set(experiment.figures())
    answer = experiment.depth_answer()
    assert answer.startswith("does sharing keep a deeper localization net stable? shared@k: ")
    assert "of 4 seeds unstable" in answer and "deep@k" in answer
    summary = experiment.summary()
    assert {"diverged_fraction", "collapsed_fraction", "worst_seed", "angle_std_deg_worst"} <= set(summary.columns)
    folder = experiment.save(tmp_path / "sweep")
    assert (folder / "stn_depth.png").is_file() and (folder / "stn_curves.png").is_file()
    again = load_experiment(folder)
    pd.testing.assert_frame_equal(again.curves, pd.read_csv(folder / "stn_curves.csv"))
    assert len(again.curves) == len(curves)


def test_a_run_saved_before_curves_and_stability_still_loads(digits, tmp_path):
    experiment = run_experiment(digits, variants=("none", "input"), seeds=1, config=TINY, test_passes=1)
    folder = experiment.save(tmp_path / "old")
    (folder / "stn_curves.csv").unlink()
    results = pd.read_csv(folder / "stn_results.csv").drop(columns=["diverged", "collapsed", "diverged_at_step"])
    results.to_csv(folder / "stn_results.csv", index=False)
    old = load_experiment(folder)
    assert old.curves.empty
    summary = old.summary().set_index("variant")
    assert summary.loc["input", "diverged_fraction"] == 0.0
    assert "stn_curves" not in old.figures() and "stn_depth" not in old.figures()


def test_the_depth_answer_is_absent_without_a_sweep():
    results = pd.DataFrame([{"variant": "input", "seed": 0, "parameters": 1, "localization_parameters": 1,
                             "test_accuracy": 0.9, "angle_std_deg": 20.0, "deming_slope": -0.5}])
    assert STNExperiment(results, pd.DataFrame(), pd.DataFrame(), {}).depth_answer() is None


def test_cli_depth_sweep_options(tmp_path, capsys):
    from alignscope.cli.main import main

    for args, message in ((["--depth-sweep", "--variants", "none"], "either --depth-sweep or --variants"),
                          (["--variants", "deep@3..1"], "runs backwards"),
                          (["--data", f"mnist:{tmp_path / 'nothing'}"], "is not a folder")):  # no bar line before it
        with pytest.raises(SystemExit) as info:
            main(["stn", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _rotation(angle: float, shift=(0.0, 0.0)) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[[c, -s, shift[0]], [s, c, shift[1]]]], dtype=torch.float64)


def test_composed_sampling_is_the_two_warps_in_turn():
    from alignscope.stn.models import compose_sampling

    first, then = _rotation(0.3, (0.1, -0.2)), _rotation(-0.5, (0.05, 0.1))
    homogeneous = [torch.cat([m[0], torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]) for m in (first, then)]
    torch.testing.assert_close(compose_sampling(first, then)[0], (homogeneous[0] @ homogeneous[1])[:2])
    # on a smooth image, sampling once at the composition equals warping twice (up to interpolation)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    blob = torch.exp(-((xs - 0.1) ** 2 + (ys + 0.05) ** 2) / 0.08)[None, None]
    twice = spatial_transform(spatial_transform(blob, first.float()), then.float())
    once = spatial_transform(blob, compose_sampling(first, then).float())
    assert (twice - once)[..., 8:-8, 8:-8].abs().max() < 0.02


def test_the_iterative_stn_reads_its_own_result(digits):
    """With a localization net that always predicts the same warp, two passes give that warp twice."""
    torch.manual_seed(0)
    model = STNClassifier("iterative", classifier="narrow", warp="rotation").eval()
    with torch.no_grad():
        model.localization.last.bias.fill_(0.2)  # 0.2 rad whatever it reads
    theta = model.predict_theta(digits.test_images[:2])
    torch.testing.assert_close(theta, _rotation(0.4).float().expand(2, 2, 3), atol=1e-6, rtol=0)
    assert model.localization_parameters() and model.loc_layers is None


def test_a_saved_run_names_its_data_by_an_absolute_path_and_loads_without_it(tmp_path, monkeypatch):
    """A run made with mnist:RELATIVE reads back from another folder; with the data gone, the results still load."""
    import numpy as np

    from alignscope.stn.data import canonical_spec

    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + np.array([n], dtype=">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())
    monkeypatch.chdir(tmp_path / "data")
    assert canonical_spec("mnist:mnist") == f"mnist:{data}" and canonical_spec("digits") == "digits"
    experiment = run_experiment("mnist:mnist", variants=("input",), seeds=1, config=TINY, test_passes=1)
    folder = experiment.save(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    again = load_experiment(folder)
    assert again.settings["data_spec"] == f"mnist:{data}" and again.test is not None
    for path in data.iterdir():
        path.unlink()
    gone = load_experiment(folder)
    assert gone.test is None and "cannot be read here" in gone.settings["test_set_missing"]
    assert len(gone.results) == 1 and "stn_warps" not in gone.figures()
