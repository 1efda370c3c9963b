import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from alignscope.errors import ModelError
from alignscope.inputs.images import bundled_photos, build_preprocess, read_rgb
from alignscope.model.build import load_checkpoint, load_model
from alignscope.model.offline_weights import convert_lite0_state_dict, lite0_key_to_timm


def test_lite0_key_mapping_examples():
    assert lite0_key_to_timm("_conv_stem.weight") == "conv_stem.weight"
    assert lite0_key_to_timm("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert lite0_key_to_timm("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert lite0_key_to_timm("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert lite0_key_to_timm("_blocks.3._project_conv.weight") == "blocks.2.0.conv_pwl.weight"
    assert lite0_key_to_timm("_blocks.15._bn2.running_var") == "blocks.6.0.bn3.running_var"
    assert lite0_key_to_timm("_fc.bias") == "classifier.bias"
    with pytest.raises(ModelError):
        lite0_key_to_timm("_blocks.16._bn0.weight")


def test_lite0_conversion_checks_shapes_and_coverage():
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    source = {"_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(ModelError, match="shape"):
        convert_lite0_state_dict(source, target)
    with pytest.raises(ModelError, match="unfilled"):
        convert_lite0_state_dict({"_fc.bias": torch.zeros(1000)}, target)


def test_pretrained_lite0_classifies_bundled_photos(lite0):
    model, cfg = lite0
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5) and cfg.pretrained
    preprocess = build_preprocess(cfg)
    photos = {p.stem: p for p in bundled_photos()}
    with torch.inference_mode():
        logits = model(torch.stack([preprocess(read_rgb(photos[n])) for n in ("coffee", "chelsea")]))
    top = logits.topk(2).indices.tolist()
    assert top[0][0] == 967  # espresso
    # the cat lies between 'tiger cat' (282) and 'Egyptian cat' (285) under timm's 0.875 centre crop
    assert top[1][0] in (281, 282, 285) and 285 in top[1]


def test_random_init_is_reported(lite0):
    _, cfg = load_model("tf_efficientnet_lite0", pretrained=False)
    assert not cfg.pretrained and "random" in cfg.weights


def test_checkpoint_wrappers_prefix_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = timm.create_model("resnet18", num_classes=10)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "b.safetensors"))
    for name in ("a.pth", "b.safetensors"):
        loaded = load_checkpoint(tmp_path / name)
        assert set(loaded) == set(net.state_dict())
    with pytest.raises(ModelError, match="do not fit"):
        load_model("resnet18", weights=tmp_path / "a.pth")  # 10 classes vs 1000


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil.pth")
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    with pytest.raises(ModelError, match="refusing"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_unknown_model_suggests_names():
    with pytest.raises(ModelError, match="resnet50"):
        load_model("resnet5")


def test_offline_hub_model_fails_in_one_line_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "alignscope", "analyze", "--model", "resnet18", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--weights FILE" in lines[0] and "--no-pretrained" in lines[0] and "tf_efficientnet_lite0" in lines[0]


def test_any_module_with_explicit_input_size():
    import alignscope

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    report = alignscope.analyze(net, transforms=["hflip"], images=torch.randn(4, 3, 16, 16), input_size=(3, 16, 16), batch_size=2)
    assert report.table["layer"].tolist() == ["0", "1"]
    with pytest.raises(alignscope.UsageError, match="input_size"):
        alignscope.analyze(net, images=torch.randn(4, 3, 16, 16))
