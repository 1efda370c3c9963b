"""STN experiments: identity at init, truly shared parameters, training, reproducibility, data, CLI."""
import pandas as pd
import pytest
import torch

from alignscope.stn import STNClassifier, load_splits, spatial_transform, train_variant
from alignscope.stn.data import apply_task
from alignscope.stn.models import VARIANTS, theta_from_params
from alignscope.transforms import parse_transform
from alignscope.warping import warp

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.fixture(scope="module")
def splits():
    return load_splits("rotate", seed=0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "none"])
@pytest.mark.parametrize("warp_kind", ["affine", "rotation", "rotation_scale"])
def test_stn_starts_as_the_identity(variant, warp_kind, splits):
    torch.manual_seed(0)
    model = STNClassifier(variant, warp=warp_kind).eval()
    x = splits.test_images[:4]
    theta = model.predict_theta(x)
    torch.testing.assert_close(theta, IDENTITY.expand(4, 2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(spatial_transform(x, theta), x, atol=1e-5, rtol=0)


def test_rotation_parameters_give_rotation_matrices():
    theta = theta_from_params(torch.tensor([[torch.pi / 2, 0.0]]), "rotation_scale")
    torch.testing.assert_close(theta[0], torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_localization_uses_the_classifiers_own_parameters(k, splits):
    torch.manual_seed(0)
    model = STNClassifier(f"shared@{k}")
    assert model.loc_body is None  # no copy of the blocks
    with torch.no_grad():
        model.localization.fc2.weight.normal_(0, 0.1)  # leave the identity so gradients reach the blocks
    x = splits.train_images[:8]
    shared = model.blocks[0][0].weight
    loc_grad = torch.autograd.grad(model.predict_theta(x).square().sum(), shared)[0]
    assert loc_grad.abs().sum() > 0  # the localization path reaches block 1's weights
    model.zero_grad()
    model(x).logsumexp(1).sum().backward()
    # the same Parameter object: one .grad holding both paths (localization on x, classification on the warp)
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    ids = {id(p) for p in model.parameters()}
    assert len(ids) == len(list(model.parameters()))
    assert all(id(p) in ids for p in model.blocks[:k].parameters())


def test_features_variant_warps_the_feature_map_not_the_image(splits):
    torch.manual_seed(0)
    model = STNClassifier("features@2").eval()
    with torch.no_grad():
        model.localization.fc2.bias.copy_(torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]))  # a 90-degree turn
    stages = model.stages(splits.test_images[:2])
    assert "stn" in stages and stages["stn"].shape == stages["block2"].shape
    assert stages["stn"].shape[1] == 16  # block 2's channels


def test_training_reduces_the_loss_and_is_reproducible(splits):
    args = (splits.train_images[:256], splits.train_labels[:256], splits.test_images[:128], splits.test_labels[:128])
    first = train_variant("shared@2", *args, seed=3, epochs=3, batch_size=32)
    second = train_variant("shared@2", *args, seed=3, epochs=3, batch_size=32)
    assert sum(first.losses[-4:]) / 4 < sum(first.losses[:4]) / 4
    assert first.losses == second.losses and first.test_accuracy == second.test_accuracy


def test_task_data_are_fixed_stratified_and_match_alignscope_warp(splits):
    again = load_splits("rotate", seed=0)
    assert torch.equal(again.test_images, splits.test_images)
    counts = torch.bincount(splits.test_labels, minlength=10)
    assert int(counts.min()) >= 50 and len(splits.test_labels) + len(splits.train_labels) == 1797
    assert float(splits.test_params.min()) >= -90 and float(splits.test_params.max()) <= 90
    x, angle = splits.test_upright[:1], float(splits.test_params[0])
    expected = warp(x, parse_transform(f"rotate{angle:.10f}")[0], 1.0, 0.0)
    torch.testing.assert_close(apply_task(x, "rotate", splits.test_params[:1]), expected, atol=1e-5, rtol=0)


def test_cli_stn_quick_subset(tmp_path, capsys):
    from alignscope.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["stn", "--variants", "none,shared@1", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path / "stn")])
    assert info.value.code == 0
    results = pd.read_csv(tmp_path / "stn" / "stn_results.csv")
    assert list(results["variant"]) == ["none", "shared@1"]
    assert {"parameters", "test_accuracy", "train_accuracy", "epochs", "seconds"} <= set(results.columns)
    alignment = pd.read_csv(tmp_path / "stn" / "stn_alignment.csv")
    assert set(alignment.loc[alignment["variant"] == "shared@1", "layer"]) == {"stn", "block1", "block2", "block3", "block4"}
    assert (tmp_path / "stn" / "stn_accuracy.png").is_file() and (tmp_path / "stn" / "stn_warps.png").is_file()
    with pytest.raises(SystemExit) as info:
        main(["stn", "--variants", "middle@9", "--out", str(tmp_path / "bad")])
    assert info.value.code == 2


def test_a_folder_of_labelled_images_is_a_dataset(tmp_path):
    from PIL import Image

    for label, value in (("bright", 220), ("dark", 30)):
        (tmp_path / label).mkdir()
        for i in range(8):
            Image.new("L", (40, 30), value + i).save(tmp_path / label / f"{i}.png")
    data = load_splits("scale", seed=1, images=tmp_path)
    assert data.classes == ["bright", "dark"]
    assert data.train_images.shape[1:] == (1, 28, 28) and len(data.test_labels) == 4
    assert float(data.test_params.min()) >= 0.5 and float(data.test_params.max()) <= 1.0
