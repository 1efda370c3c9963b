"""STN experiments: wiring with answers known by construction (no accuracy claims).

Identity at init, shared gradients, features@k warps the map, the angle metric on
hand-made rotations, the Deming slope, IDX parsing, fresh seeded transforms, the
optimiser groups and the CLI.
"""
import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alignscope.errors import ImageError, UsageError
from alignscope.stn import (CLASSIFIERS, STNClassifier, FixedTestSet, TrainConfig, TrainStream, angle_metrics, deming_slope,
                            load_data, read_idx, spatial_transform, train_variant, variant_names, warp_angle_deg)
from alignscope.stn.angles import NO_COMPENSATION_STD
from alignscope.stn.data import apply_task, invert_affine, task_matrices
from alignscope.stn.train import RECIPES, SCHEDULES, make_optimizer, make_schedule, recipe
from alignscope.geometry.transforms import parse_transform
from alignscope.geometry.warping import warp

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
ALL_VARIANTS = [(c, v) for c in CLASSIFIERS for v in variant_names(c) if v != "none"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", data_seed=0)


@pytest.mark.parametrize("classifier,variant", ALL_VARIANTS)
@pytest.mark.parametrize("warp_kind", ["affine", "rotation", "rotation_scale"])
def test_stn_starts_as_the_identity(classifier, variant, warp_kind, digits):
    torch.manual_seed(0)
    model = STNClassifier(variant, warp=warp_kind, classifier=classifier).eval()
    x = digits.test_images[:4]
    theta = model.predict_theta(x)
    torch.testing.assert_close(theta, IDENTITY.expand(4, 2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(spatial_transform(x, theta), x, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = STNClassifier("none", classifier=classifier).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("layers.", "head."))})
        if not variant.startswith("features"):  # an identity warp of the input changes nothing downstream
            torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=0)


def test_classifiers_have_the_documented_layers():
    classic, small = STNClassifier("none", classifier="classic"), STNClassifier("none", classifier="small")
    x = torch.zeros(2, 1, 28, 28)
    assert [tuple(h.shape[1:]) for h in classic.stages(x).values()] == [(64, 10, 10), (64, 2, 2)]
    assert [tuple(h.shape[1:]) for h in small.stages(x).values()] == [(16, 26, 26), (16, 12, 12), (32, 10, 10), (32, 4, 4)]
    narrow = STNClassifier("none", classifier="narrow")
    assert [tuple(h.shape[1:]) for h in narrow.stages(x).values()] == [(4, 26, 26), (4, 12, 12), (8, 10, 10), (8, 4, 4)]
    assert [m.kernel_size for m in classic.modules() if isinstance(m, torch.nn.Conv2d)] == [(9, 9), (7, 7)]
    assert [m.stride for m in small.modules() if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (2, 2), (1, 1), (2, 2)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.15 for m in small.modules())
    with pytest.raises(UsageError, match="does not fit"):
        STNClassifier("features@2", classifier="classic")


@pytest.mark.parametrize("classifier,k", [("small", 1), ("small", 3), ("classic", 1)])
def test_shared_layers_get_gradients_from_both_paths(classifier, k, digits):
    torch.manual_seed(0)
    model = STNClassifier(f"shared@{k}", classifier=classifier)
    assert model.loc_layers is None  # no copy of the layers
    with torch.no_grad():
        model.localization.last.weight.normal_(0, 0.1)  # leave the identity so gradients reach the layers
    x = digits.train_images[:8]
    shared = model.layers[0][0].weight
    loc_grad = torch.autograd.grad(model.predict_theta(x).square().sum(), shared)[0]
    assert loc_grad.abs().sum() > 0  # the localization path alone reaches layer 1's weights
    # warping by a fixed theta: the classification path alone also reaches them
    cls_grad = torch.autograd.grad(model.head(model.stages(x)[f"layer{len(model.layers)}"].flatten(1)).sum(), shared)[0]
    both = torch.autograd.grad(model(x).logsumexp(1).sum(), shared)[0]
    assert cls_grad.abs().sum() > 0 and both.abs().sum() > 0
    assert shared not in set(model.localization_parameters())
    assert all(p in set(model.parameters()) for p in model.layers[:k].parameters())


def test_deep_variant_has_its_own_freshly_initialised_layers(digits):
    torch.manual_seed(0)
    model = STNClassifier("deep@2", classifier="small")
    assert len(model.loc_layers) == 2
    own = {id(p) for p in model.loc_layers.parameters()}
    assert own.isdisjoint(id(p) for p in model.layers.parameters())
    assert not torch.equal(model.loc_layers[0][0].weight, model.layers[0][0].weight)
    assert own <= {id(p) for p in model.localization_parameters()}
    with torch.no_grad():
        model.localization.last.weight.normal_(0, 0.1)
    grad = torch.autograd.grad(model(digits.train_images[:8]).logsumexp(1).sum(), model.loc_layers[0][0].weight)[0]
    assert grad.abs().sum() > 0


def test_features_variant_warps_the_feature_map_not_the_image(digits):
    torch.manual_seed(0)
    model = STNClassifier("features@2", classifier="small").eval()
    x = digits.test_images[:2]
    with torch.no_grad():
        model.localization.last.bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 1.0, -1.0, 0.0]))  # theta = 90-degree turn
        stages = model.stages(x)
        layer2 = model.layers[1](model.layers[0](x))
    assert stages["stn"].shape == stages["layer2"].shape == layer2.shape == (2, 16, 12, 12)
    # theta [[0,-1],[1,0]]: output (x, y) samples the input at (-y, x): a quarter turn of the 12 x 12 map, exact
    torch.testing.assert_close(stages["stn"], torch.rot90(layer2, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_data_rotation_matches_alignscope_and_the_compensating_warp_undoes_it(digits):
    x = digits.test_images[:3]
    angles = torch.tensor([30.0, -61.5, 88.0], dtype=torch.float64)
    for i, angle in enumerate(angles.tolist()):
        expected = warp(x[i: i + 1], parse_transform(f"rotate{angle:.10f}")[0], 1.0, 0.0)
        torch.testing.assert_close(apply_task(x[i: i + 1], "rotate", angles[i: i + 1]), expected, atol=1e-5, rtol=0)
    # the STN that undoes theta samples with the data's forward matrix; its warp angle is -theta
    forward = task_matrices("rotate", angles).float()
    back = spatial_transform(apply_task(x, "rotate", angles), forward)
    centre = (slice(None), slice(None), slice(8, 20), slice(8, 20))
    assert float((back - x)[centre].abs().mean()) < 0.05 < float((apply_task(x, "rotate", angles) - x)[centre].abs().mean())
    torch.testing.assert_close(warp_angle_deg(forward), -angles, atol=1e-4, rtol=0)
    torch.testing.assert_close(warp_angle_deg(invert_affine(task_matrices("rotate", angles))), angles, atol=1e-9, rtol=0)


def test_angle_metric_on_hand_made_warps():
    generator = torch.Generator().manual_seed(0)
    n = 4000
    theta = torch.rand(n, generator=generator, dtype=torch.float64) * 180 - 90
    labels = torch.arange(n) % 10
    pose = labels.to(torch.float64) * 17.0 - 60.0  # a different canonical pose per class
    # full compensation (with per-class poses, some wrapping past 180 degrees)
    full = angle_metrics(theta, torch.remainder(-theta + pose + 180, 360) - 180, labels)
    assert full["angle_std_deg"] < 1e-6 and full["deming_slope"] == pytest.approx(-1.0, abs=1e-6)
    none = angle_metrics(theta, torch.zeros(n, dtype=torch.float64), labels)
    assert none["angle_std_deg"] == pytest.approx(NO_COMPENSATION_STD, abs=1.5)
    assert none["deming_slope"] == pytest.approx(0.0, abs=1e-9)
    half = angle_metrics(theta, -0.5 * theta, labels)
    assert half["angle_std_deg"] == pytest.approx(NO_COMPENSATION_STD / 2, abs=1.0)
    assert half["deming_slope"] == pytest.approx(-0.5, abs=0.02)
    # read from real matrices: an STN whose sampling matrices are rotations by -theta + pose
    sampling = invert_affine(task_matrices("rotate", -theta + pose))
    read = angle_metrics(theta, warp_angle_deg(sampling), labels)
    assert read["angle_std_deg"] < 1e-6 and read["deming_slope"] == pytest.approx(-1.0, abs=1e-6)


def test_deming_slope_known_lines():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    assert deming_slope(x, -x) == pytest.approx(-1.0)
    assert deming_slope(x, 2 * x + 3) == pytest.approx(2.0)
    # orthogonal regression is symmetric: the slope of x on y is the reciprocal
    y = 0.7 * x + 0.1 * torch.sin(13 * x)
    assert deming_slope(x, y) * deming_slope(y, x) == pytest.approx(1.0)


def _write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + body)


def _tiny_mnist(folder, n_train=12, n_test=6, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_are_read_exactly(tmp_path, gz):
    arrays = _tiny_mnist(tmp_path / "mnist", gz=gz)
    data = load_data(f"mnist:{tmp_path / 'mnist'}")
    images, labels = arrays["train"]
    torch.testing.assert_close(data.train_images[:, 0], torch.from_numpy(images.astype(np.float32) / 255), atol=0, rtol=0)
    assert data.train_labels.tolist() == labels.tolist() and len(data.test_labels) == 6
    big_endian = np.arange(6, dtype=np.int32).reshape(2, 3) * 70000
    _write_idx(tmp_path / "ints", big_endian)
    assert np.array_equal(read_idx(tmp_path / "ints"), big_endian)


def test_bad_idx_files_fail_with_one_clear_error(tmp_path):
    folder = tmp_path / "mnist"
    _tiny_mnist(folder, gz=False)
    raw = (folder / "train-labels-idx1-ubyte").read_bytes()
    (folder / "train-labels-idx1-ubyte").write_bytes(raw[:-1])
    with pytest.raises(ImageError, match="header says"):
        load_data(f"mnist:{folder}")
    (folder / "train-labels-idx1-ubyte").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(ImageError, match="not an IDX file"):
        load_data(f"mnist:{folder}")
    _write_idx(folder / "train-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))  # 12 images, 5 labels
    with pytest.raises(ImageError, match="12 images"):
        load_data(f"mnist:{folder}")
    with pytest.raises(ImageError, match="no t10k-images"):
        (folder / "t10k-images-idx3-ubyte").unlink()
        _write_idx(folder / "train-labels-idx1-ubyte", np.arange(12, dtype=np.uint8) % 10)
        load_data(f"mnist:{folder}")
    with pytest.raises(UsageError, match="unknown data"):
        load_data("cifar:x")


def test_training_transforms_are_fresh_per_epoch_and_seeded(digits):
    images, labels = digits.train_images[:8], digits.train_labels[:8]
    first = TrainStream(images, labels, "rotate", 8, seed=5)
    batches = [b for _, b in zip(range(2), first)]
    (x0, y0, p0), (x1, y1, p1) = batches
    # same 8 images each epoch (the batch is the whole set), but new angles
    assert sorted(y0.tolist()) == sorted(y1.tolist()) and not torch.allclose(p0.sort().values, p1.sort().values)
    again = [b for _, b in zip(range(2), TrainStream(images, labels, "rotate", 8, seed=5))]
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert float(p0.abs().max()) <= 90
    test = FixedTestSet.make(digits.test_images[:5], digits.test_labels[:5], "rotate", passes=3, seed=1)
    assert test.params.shape == (3, 5) and not torch.equal(test.params[0], test.params[1])
    assert torch.equal(test.params, FixedTestSet.make(digits.test_images[:5], digits.test_labels[:5], "rotate", 3, 1).params)


def test_border_padding_repeats_the_edge():
    bright = torch.ones(1, 1, 28, 28)
    turned = apply_task(bright, "rotate", torch.tensor([45.0]))
    torch.testing.assert_close(turned, bright, atol=1e-6, rtol=0)  # zeros padding would darken the corners
    theta = task_matrices("rotate", torch.tensor([45.0])).float()
    torch.testing.assert_close(spatial_transform(bright, theta), bright, atol=1e-6, rtol=0)


def test_optimizer_groups_follow_the_recipe():
    model = STNClassifier("shared@2", classifier="small")
    optimizer = make_optimizer(model, TrainConfig(lr=0.01, loc_lr_multiplier=10.0))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0
    main, loc = optimizer.param_groups
    assert main["lr"] == 0.01 and loc["lr"] == pytest.approx(0.1)
    assert {id(p) for p in loc["params"]} == {id(p) for p in model.localization.parameters()}
    assert model.layers[0][0].weight in main["params"]
    with pytest.raises(UsageError):
        TrainConfig(optimizer="lbfgs")


@pytest.mark.parametrize("schedule,expected", [
    ("step", [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),  # x0.1 after steps 4 and 6 of 8
    ("cosine", [1, *(0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(1, 8))]),
    ("constant", [1] * 8),
])
def test_schedules_scale_every_group(schedule, expected):
    model = STNClassifier("input", classifier="small")
    config = TrainConfig(lr=0.02, loc_lr_multiplier=3.0, iterations=8, schedule=schedule)
    optimizer = make_optimizer(model, config)
    scheduler = make_schedule(optimizer, config)
    seen = []
    for _ in range(8):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(torch.tensor(seen), torch.tensor([[0.02 * f, 0.06 * f] for f in expected]),
                               rtol=1e-9, atol=1e-12)
    assert set(SCHEDULES) == {"step", "cosine", "constant"}
    with pytest.raises(UsageError, match="schedule"):
        TrainConfig(schedule="linear")


def test_localization_weight_decay_reaches_only_the_localization_net():
    model = STNClassifier("deep@2", classifier="small")
    main, loc = make_optimizer(model, TrainConfig(optimizer="adam", loc_weight_decay=1e-3)).param_groups
    assert main["weight_decay"] == 0 and loc["weight_decay"] == 1e-3
    assert {id(p) for p in loc["params"]} == {id(p) for p in model.localization_parameters()}
    # with no gradient at all, only decay moves the weights: the localization net shrinks, the classifier stays
    torch.manual_seed(0)
    model = STNClassifier("input", classifier="small")
    loc_before = [p.detach().clone() for p in model.localization.body.parameters()]
    main_before = [p.detach().clone() for p in model.layers.parameters()]
    optimizer = make_optimizer(model, TrainConfig(lr=0.1, loc_weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for before, p in zip(loc_before, model.localization.body.parameters()):
        torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5))
    for before, p in zip(main_before, model.layers.parameters()):
        torch.testing.assert_close(p.detach(), before)
    with pytest.raises(UsageError):
        TrainConfig(loc_weight_decay=-1.0)


def test_recipes_are_named_configs_with_overrides():
    assert RECIPES["paper"] == TrainConfig()  # the papers' SGD recipe is the dataclass default
    assert (RECIPES["paper"].optimizer, RECIPES["paper"].lr, RECIPES["paper"].batch_size) == ("sgd", 0.01, 256)
    digits = RECIPES["digits"]
    assert recipe("digits") == digits
    changed = recipe("digits", lr=0.5, iterations=7, ramp=None)
    assert (changed.lr, changed.iterations, changed.ramp, changed.optimizer) == (0.5, 7, digits.ramp, digits.optimizer)
    with pytest.raises(UsageError, match="recipe"):
        recipe("fast")
    from alignscope.cli.experiments import stn as stn_command

    assert set(next(p for p in stn_command.params if p.name == "recipe").type.choices) == set(RECIPES)
    assert set(next(p for p in stn_command.params if p.name == "classifier").type.choices) == set(CLASSIFIERS)


def test_training_is_reproducible_and_learns(digits):
    config = TrainConfig(optimizer="adam", lr=3e-3, iterations=24, batch_size=16)
    images, labels = digits.train_images[:160], digits.train_labels[:160]
    first = train_variant("input", images, labels, "rotate", 3, config)
    second = train_variant("input", images, labels, "rotate", 3, config)
    assert first.losses == second.losses
    assert sum(first.losses[-6:]) / 6 < sum(first.losses[:6]) / 6 - 0.2
    decayed = train_variant("none", digits.train_images[:64], digits.train_labels[:64], "rotate", 0,
                            TrainConfig(iterations=4, batch_size=16))
    assert len(decayed.losses) == 4 and all(math.isfinite(v) for v in decayed.losses)


def test_supervised_control_learns_the_known_warp_and_nothing_else(digits):
    """The control's loss is the distance to the exactly undoing matrix (0 for that matrix, by construction);
    only its localization net changes; its accuracy is not reported; its warps turn against the rotation."""
    images, labels = digits.train_images[:128], digits.train_labels[:128]
    config = TrainConfig(optimizer="adam", lr=3e-3, iterations=60, batch_size=32)
    torch.manual_seed(5)
    initial = STNClassifier("supervised", classifier="narrow").state_dict()
    result = train_variant("supervised", images, labels, "rotate", 5, config, "narrow")
    model = result.model
    assert model.warps_input and model.supervised
    trained = model.state_dict()
    for name, value in initial.items():
        moved = not torch.equal(value, trained[name])
        assert moved == name.startswith("localization."), name
    assert sum(result.losses[-10:]) / 10 < 0.5 * sum(result.losses[:10]) / 10
    # the target: the sampling matrix of the exact inverse rotation, whose warp angle is -theta
    theta = torch.tensor([40.0, -75.0], dtype=torch.float64)
    torch.testing.assert_close(warp_angle_deg(task_matrices("rotate", theta)), -theta)
    test = FixedTestSet.make(digits.test_images[:60], digits.test_labels[:60], "rotate", 1, seed=0)
    from alignscope.stn.evaluate import evaluate

    found = evaluate(model, test)
    assert math.isnan(found.metrics["test_accuracy"])
    assert set(found.alignment) == {"stn"}  # the layers behind it are an untrained classifier's
    assert found.metrics["deming_slope"] < -0.3  # 60 steps: turning against theta, far from done
    # its loss reaches the localization net directly: the multiplier for learning through the classifier is off
    groups = make_optimizer(STNClassifier("supervised", classifier="narrow"), TrainConfig(lr=0.01, loc_lr_multiplier=10.0))
    assert [group["lr"] for group in groups.param_groups] == [0.01, 0.01]


def test_parallel_runs_give_the_numbers_of_one_process(digits):
    from alignscope.stn import UprightData, run_experiment

    small = UprightData(digits.train_images[:96], digits.train_labels[:96], digits.test_images[:40],
                        digits.test_labels[:40], digits.classes, "digits subset")
    config = TrainConfig(optimizer="adam", lr=3e-3, iterations=6, batch_size=16, ramp=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting
    try:
        one = run_experiment(small, variants=("none", "input"), seeds=2, config=config, test_passes=1)
    finally:
        torch.set_num_threads(threads)
    steps = []
    two = run_experiment(small, variants=("none", "input"), seeds=2, config=config, test_passes=1, jobs=2,
                         progress=lambda done, total: steps.append((done, total)))
    columns = [c for c in one.results.columns if c not in ("seconds", "cpu_seconds")]
    pd.testing.assert_frame_equal(one.results[columns], two.results[columns])
    pd.testing.assert_frame_equal(one.angles, two.angles)
    assert [d for d, _ in steps] == sorted(d for d, _ in steps) and steps[-1] == (4 * 6, 4 * 6)
    assert two.settings["jobs"] == 2 and set(two.models) == {"none", "input"}
    with pytest.raises(UsageError, match="jobs"):
        run_experiment(small, variants=("none",), seeds=1, config=config, jobs=0)


def test_cli_stn_subset(tmp_path):
    from alignscope.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["stn", "--variants", "none,shared@1", "--seeds", "1", "--iterations", "3", "--batch-size", "32",
              "--test-passes", "2", "--recipe", "paper", "--schedule", "cosine", "--out", str(tmp_path / "stn")])
    assert info.value.code == 0
    settings = json.loads((tmp_path / "stn" / "run.json").read_text())
    paper = RECIPES["paper"]
    assert (settings["optimizer"], settings["lr"], settings["loc_lr_multiplier"]) == (paper.optimizer, paper.lr, 1.0)
    assert (settings["iterations"], settings["batch_size"], settings["schedule"]) == (3, 32, "cosine")
    results = pd.read_csv(tmp_path / "stn" / "stn_results.csv")
    assert list(results["variant"]) == ["none", "shared@1"]
    assert {"parameters", "test_accuracy", "angle_std_deg", "deming_slope", "iterations", "seconds"} <= set(results.columns)
    assert results.loc[0, "angle_std_deg"] == pytest.approx(NO_COMPENSATION_STD, abs=5)  # none: phi = 0
    assert results.loc[0, "deming_slope"] == 0
    alignment = pd.read_csv(tmp_path / "stn" / "stn_alignment.csv")
    assert set(alignment.loc[alignment["variant"] == "shared@1", "layer"]) == {"stn", "layer1", "layer2", "layer3", "layer4"}
    angles = pd.read_csv(tmp_path / "stn" / "stn_angles.csv")
    assert set(angles["variant"]) == {"shared@1"} and len(angles) == 535
    for name in ("stn_accuracy.png", "stn_angles.png", "stn_warps.png", "stn_summary.csv"):
        assert (tmp_path / "stn" / name).is_file()
    for bad in (["--variants", "middle@9"], ["--classifier", "classic", "--variants", "features@2"],
                ["--data", f"mnist:{tmp_path / 'nowhere'}"], ["--lr", "0"], ["--recipe", "fast"],
                ["--schedule", "linear"], ["--loc-weight-decay", "-1"]):
        with pytest.raises(SystemExit) as info:
            main(["stn", *bad, "--out", str(tmp_path / "bad")])
        assert info.value.code == 2


def test_cli_combines_saved_runs_into_one_comparison(tmp_path):
    from alignscope.cli.main import main

    tiny = ["--seeds", "1", "--iterations", "2", "--batch-size", "16", "--test-passes", "1"]
    for variant, extra in (("none", []), ("input", []), ("deep@1", ["--lr", "0.5"])):
        with pytest.raises(SystemExit) as info:
            main(["stn", "--variants", variant, *tiny, *extra, "--out", str(tmp_path / variant)])
        assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["stn", "--combine", str(tmp_path / "none"), "--combine", str(tmp_path / "input"), "--out", str(tmp_path / "all")])
    assert info.value.code == 0
    combined = pd.read_csv(tmp_path / "all" / "stn_results.csv")
    parts = pd.concat([pd.read_csv(tmp_path / v / "stn_results.csv") for v in ("none", "input")], ignore_index=True)
    pd.testing.assert_frame_equal(combined, parts)
    angles = pd.read_csv(tmp_path / "all" / "stn_angles.csv")
    pd.testing.assert_frame_equal(angles, pd.read_csv(tmp_path / "input" / "stn_angles.csv"))
    assert list(pd.read_csv(tmp_path / "all" / "stn_summary.csv")["variant"]) == ["none", "input"]
    # the saved seed-0 weights come back: the combined folder's models predict what the input run's model did
    from alignscope.stn.saved import load_experiment

    again = load_experiment(tmp_path / "all")
    assert set(again.models) == {"none", "input"} and again.test is not None
    theta = again.models["input"].predict_theta(again.test.upright[:4])
    original = load_experiment(tmp_path / "input").models["input"].predict_theta(again.test.upright[:4])
    torch.testing.assert_close(theta, original, rtol=0, atol=0)
    for name in ("stn_accuracy.png", "stn_angles.png", "stn_warps.png"):
        assert (tmp_path / "all" / name).is_file()
    for bad in ([tmp_path / "none", tmp_path / "deep@1"],  # another learning rate: not one experiment
                [tmp_path / "input", tmp_path / "input"],  # the same runs twice
                [tmp_path / "nowhere"]):
        with pytest.raises(SystemExit) as info:
            main(["stn", *(a for folder in bad for a in ("--combine", str(folder))), "--out", str(tmp_path / "bad")])
        assert info.value.code == 2


def test_a_folder_of_labelled_images_is_a_dataset(tmp_path):
    from PIL import Image

    for label, value in (("bright", 220), ("dark", 30)):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.new("L", (40, 30), value + i).save(tmp_path / label / f"{i}.png")
    data = load_data(f"folder:{tmp_path}", data_seed=1)
    assert data.classes == ["bright", "dark"]
    assert data.train_images.shape[1:] == (1, 28, 28) and len(data.test_labels) == 4


def _results(rows):
    return pd.DataFrame([{"variant": v, "seed": s, "parameters": 1, "localization_parameters": 0, "test_accuracy": a,
                          "angle_std_deg": 1.0, "deming_slope": 1.0} for v, s, a in rows])


def test_the_experiment_answers_its_question_in_one_line():
    from alignscope.stn.experiment import STNExperiment

    one = STNExperiment(_results([("none", 0, 0.80), ("input", 0, 0.95), ("features@1", 0, 0.90)]),
                        pd.DataFrame(), pd.DataFrame(), {})
    line = one.answer()
    assert line.startswith("where should the STN go? best test accuracy: input 0.950")
    assert "none 0.800" in line and "1 seed" in line and "±" not in line and "\n" not in line
    three = STNExperiment(_results([(v, s, a + 0.01 * s) for s in range(3) for v, a in (("none", 0.8), ("deep@1", 0.9))]),
                          pd.DataFrame(), pd.DataFrame(), {})
    line = three.answer()
    assert "deep@1 0.910 ± 0.010" in line and "over 3 seeds" in line




def _find_mnist() -> Path:
    """$ALIGNSCOPE_MNIST, else shared/data/mnist beside the checkout or beside any folder above it."""
    if os.environ.get("ALIGNSCOPE_MNIST"):
        return Path(os.environ["ALIGNSCOPE_MNIST"])
    root = Path(__file__).resolve().parents[1]
    for folder in root.parents:
        if (folder / "shared" / "data" / "mnist").is_dir():
            return folder / "shared" / "data" / "mnist"
    return root.parent / "shared" / "data" / "mnist"


SHARED_MNIST = _find_mnist()
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # the standard MNIST training split


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST files are not in $ALIGNSCOPE_MNIST nor in shared/data/"
                                                      "mnist beside the checkout or a folder above it (set "
                                                      "ALIGNSCOPE_MNIST to the folder of the four IDX files)")
def test_the_real_mnist_files_read_and_train():
    from alignscope.stn import UprightData, load_data, run_experiment

    data = load_data(f"mnist:{SHARED_MNIST}")
    assert tuple(data.train_images.shape) == (60000, 1, 28, 28) and tuple(data.test_images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0
    small = UprightData(data.train_images[:128], data.train_labels[:128], data.test_images[:32], data.test_labels[:32],
                        data.classes, "MNIST subset")
    result = run_experiment(small, variants=("none", "input"), seeds=1, test_passes=1,
                            config=TrainConfig(optimizer="adam", lr=3e-3, iterations=4, batch_size=16, ramp=0.5))
    assert set(result.results["variant"]) == {"none", "input"} and result.results["test_accuracy"].between(0, 1).all()
