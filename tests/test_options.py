"""The model options, said once: one ModelOptions behind analyze(), explain(), the benchmark and the commands."""
import json
import logging
import math
import os
from dataclasses import replace

import click
import pytest
import torch
from torch import nn

import alignscope
from alignscope.bench import bench
from alignscope.cli.main import _print_summary, app, main
from alignscope.cli.options import model_options
from alignscope.errors import UsageError
from alignscope.explain import explain
from alignscope.model.options import ModelOptions


def _cli(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


class _Stack(nn.Module):
    """Three convolutions, no feature_info: the default layers are all three (the capped fallback)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c = nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture()
def stack():
    torch.manual_seed(0)
    return _Stack().eval()


@pytest.fixture()
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 16, 16)


# --- one object, one path ------------------------------------------------------------------------


def test_keywords_and_options_give_the_same_run(stack, images):
    by_keywords = alignscope.analyze(stack, transforms=["rot90", "translate2,0"], images=images, layers=["a", "b"],
                                     input_size=(3, 16, 16), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), batch_size=4)
    options = ModelOptions(stack, input_size=(3, 16, 16), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), layers=("a", "b"))
    by_options = alignscope.analyze(options, transforms=["rot90", "translate2,0"], images=images, batch_size=4)
    assert list(by_options.table["layer"].unique()) == ["a", "b"]
    columns = ["layer", "transform", "aligned_error", "unaligned_error", "chance_distance"]
    assert by_keywords.table[columns].equals(by_options.table[columns])
    block = by_options.meta["model_options"]
    assert block == by_keywords.meta["model_options"] == {
        "model": "nn.Module _Stack", "weights": "auto", "pretrained": True, "input_size": [3, 16, 16],
        "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7], "layers": ["a", "b"], "device": "cpu"}
    # the fill value of the warps is black after this normalization: the options' mean/std were used
    assert by_options.meta["data_config"]["mean"] == (0.1, 0.2, 0.3)


def test_run_json_holds_the_options_as_one_block(stack, images, tmp_path):
    report = alignscope.analyze(ModelOptions(stack, input_size=16, layers="c", pretrained=False), transforms=["hflip"],
                                images=images, batch_size=4)
    report.save(tmp_path / "out", plots=False)
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["model_options"] == {"model": "nn.Module _Stack", "weights": "auto", "pretrained": False,
                                     "input_size": [16, 16], "mean": None, "std": None, "layers": ["c"], "device": "cpu"}
    assert meta["data_config"]["input_size"] == [3, 16, 16] and meta["layers"] == ["c"]
    # a module declared untrained is reported as random weights, like --no-pretrained
    assert meta["pretrained"] is False and any("RANDOM WEIGHTS" in line for line in report.warnings())


def test_keywords_fill_the_options_and_contradictions_are_refused(stack):
    options = ModelOptions(stack, input_size=(3, 16, 16), layers=("a",))
    assert ModelOptions.build(options) is options
    assert ModelOptions.build(options, device="cpu", weights=None).layers == ("a",)  # defaults change nothing
    assert ModelOptions.build(options, mean=(0.5, 0.5, 0.5)).mean == (0.5, 0.5, 0.5)  # fills a field left at default
    assert ModelOptions.build(options, layers=["a"]) == options  # the same value, said twice, is no contradiction
    with pytest.raises(UsageError, match=r"layers=\('b',\) \(the options say \('a',\)\)"):
        ModelOptions.build(options, layers="b")
    with pytest.raises(UsageError, match="layers="):  # before the model is touched
        alignscope.analyze(options, layers=["c"])
    with pytest.raises(UsageError, match="unknown model option"):
        ModelOptions.build("resnet18", colour="red")


@pytest.mark.parametrize("changes, message", [
    (dict(input_size=(0, 16)), "input_size must be"),
    (dict(input_size=(3, 16, 16, 16)), "input_size must be"),
    (dict(input_size=(3, 16.5, 16)), "input_size must be"),
    (dict(input_size="16"), "input_size must be"),
    (dict(input_size=(3, math.nan, 16)), "input_size must be"),
    (dict(mean=(0.5, 0.5), std=(1.0, 1.0, 1.0)), "mean has 2 values and std 3"),
    (dict(std=(0.2, 0.0, 0.2)), "std must be finite numbers above 0"),
    (dict(mean=(0.5, math.nan, 0.5)), "mean must be finite numbers"),
    (dict(mean="abc"), "mean must be numbers"),
    (dict(weights="w.pth"), "weights= applies to timm model names"),
    (dict(pretrained="yes"), "pretrained must be True or False"),
    (dict(device="warp9"), "unknown device 'warp9'"),
    (dict(layers=[3]), "layers must be module names"),
    (dict(model=5), "model must be a timm model name or an nn.Module"),
    (dict(model=" "), "model must be a timm model name or an nn.Module"),
])
def test_bad_values_fail_when_the_options_are_made(stack, changes, message):
    with pytest.raises(UsageError, match=message):
        ModelOptions(**({"model": stack, "input_size": (3, 16, 16)} | changes))


def test_values_are_normalized(stack, tmp_path):
    options = ModelOptions("resnet18", weights=tmp_path / "w.pth", input_size=[3, 64, 64.0], mean=[0, 1, 0], std=(1, 1, 1),
                           layers="layer1", device=torch.device("cpu"))
    assert options.weights == str(tmp_path / "w.pth") and isinstance(options.weights, str)
    assert options.input_size == (3, 64, 64) and all(isinstance(v, int) for v in options.input_size)
    assert options.mean == (0.0, 1.0, 0.0) and options.layers == ("layer1",) and options.device == "cpu"
    assert ModelOptions("resnet18", input_size=96).input_size == (96, 96)
    assert ModelOptions("resnet18", weights=None).weights == "auto"
    assert ModelOptions("resnet18", layers=None).layers is None
    with pytest.raises(UsageError, match="selects no layer"):  # an empty list is a mistake, not "the default"
        ModelOptions("resnet18", layers=[])
    with pytest.raises(UsageError, match="input_size must be"):
        replace(options, input_size=(3, -1, 4))  # replace checks again


def test_one_mean_and_std_per_input_channel_is_checked_as_soon_as_the_channels_are_known(stack):
    # input_size with C: when the options are made, before any model is loaded
    with pytest.raises(UsageError, match=r"mean \(--mean\) has 1 value\(s\) but input_size has 3 channel\(s\)"):
        ModelOptions("resnet18", input_size=(3, 16, 16), mean=(0.5,), std=(0.5,))
    with pytest.raises(UsageError, match=r"std \(--std\) has 2 value\(s\) but input_size has 1 channel\(s\)"):
        ModelOptions(stack, input_size=(1, 16, 16), std=(0.5, 0.5))
    # (H, W) only: the model's own channel count decides, at load
    with pytest.raises(UsageError, match="mean has 1 and std 1 values for 3 input channels"):
        ModelOptions("resnet18", input_size=(16, 16), mean=(0.5,), std=(0.5,), pretrained=False).load()
    with pytest.raises(UsageError, match="needs input_size"):
        ModelOptions(stack).load()


def test_a_timm_name_keeps_its_provenance_when_size_and_normalization_change():
    options = ModelOptions("resnet18", pretrained=False, input_size=(64, 80), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    module, cfg = options.load()
    timm_cfg = module.pretrained_cfg
    assert cfg.input_size == (3, 64, 80)  # channels from the model's own config
    assert cfg.mean == (0.5, 0.4, 0.3) and cfg.std == (0.2, 0.2, 0.2)
    assert cfg.pretrained is False and cfg.weights.startswith("random init")
    assert cfg.model_name == "resnet18" and cfg.crop_pct == pytest.approx(timm_cfg["crop_pct"])
    assert cfg.interpolation == timm_cfg["interpolation"]


def test_analyze_of_a_resized_timm_name_still_says_random_weights():
    report = alignscope.analyze("resnet18", pretrained=False, input_size=(3, 32, 32), layers=["layer1"],
                                transforms=["hflip"], images=torch.randn(2, 3, 32, 32), batch_size=2)
    assert report.meta["pretrained"] is False and report.meta["weights"].startswith("random init")
    assert report.table["pretrained"].eq(False).all()
    assert any("RANDOM WEIGHTS" in line for line in report.warnings())


# --- explain and the benchmark -----------------------------------------------------------------------


def test_explain_takes_the_options_and_defaults_to_the_stage_whose_channels_swap_most(stack, images):
    result = explain(ModelOptions(stack, input_size=(3, 16, 16)), transform="rot90", images=images, batch_size=4)
    assert result.meta["model_options"]["input_size"] == [3, 16, 16]
    # each stage on its own, then the default must be the one with the largest share of moved channels (ties: deepest)
    share = {}
    for name in ("a", "c"):
        one = explain(stack, layer=name, transform="rot90", images=images, batch_size=4, input_size=(3, 16, 16))
        assert one.meta["layer"] == name and one.meta["layer_reason"].startswith("asked for")
        share[name] = one.meta["channels_moved_by_permutation"] / one.meta["shape"][0]
    expected = max(share, key=lambda name: (share[name], name == "c"))
    assert result.meta["layer"] == expected and "pass --layer" in result.meta["layer_reason"]
    assert result.meta["channels_moved_by_permutation"] / result.meta["shape"][0] == share[expected]
    named = explain(stack, layer="b", transform="rot90", images=images, batch_size=4, input_size=(3, 16, 16))
    assert named.meta["layer"] == "b" and named.meta["model_options"]["layers"] == ["b"]
    with pytest.raises(UsageError, match="explain takes one layer"):
        explain(stack, layer="*", transform="rot90", images=images, input_size=(3, 16, 16))


def test_the_benchmark_takes_the_options_and_records_them(stack, images):
    result = bench.benchmark(ModelOptions(stack, input_size=(3, 16, 16), layers=("b",)), images=images, max_images=None,
                             transforms=["rot90"], batch_size=2, repeats=1)
    assert result["layers"] == ["b"] and result["model_options"]["layers"] == ["b"]


def test_children_get_every_model_option(tmp_path):
    from alignscope.cli.experiments import bench as command

    options = ModelOptions("resnet18", weights="w.safetensors", pretrained=False, input_size=(3, 64, 80),
                           mean=(0.5, 0.25, 0.125), std=(0.1, 0.2, 0.3), layers=("layer1", "layer2"), device="cpu")
    params = command.make_context("bench", bench.bench_arguments(options, max_images=8, batch_size=4)).params
    assert params["input_size"] == (3, 64, 80) and params["mean"] == (0.5, 0.25, 0.125) and params["std"] == (0.1, 0.2, 0.3)
    assert params["weights"] == os.path.abspath("w.safetensors") and params["no_pretrained"]
    assert list(params["layers"]) == ["layer1", "layer2"] and params["batch_size"] == 4
    with pytest.raises(UsageError, match="nn.Module cannot be handed"):
        ModelOptions(nn.Conv2d(3, 3, 1), input_size=8).argv()


# --- the command line ---------------------------------------------------------------------------------


def test_the_flags_read_back_into_the_same_options(tmp_path):
    seen = []

    @click.command()
    @model_options
    def probe(options):
        seen.append(options)

    options = ModelOptions("resnet18", weights=str(tmp_path / "w.pth"), pretrained=False, input_size=(3, 64, 80),
                           mean=(0.5, 0.25, 1 / 3), std=(0.1, 0.2, 0.3), layers=("layer1", "layer*"), device="auto")
    probe.main(args=options.argv(), standalone_mode=False)
    assert seen == [options]
    probe.main(args=[], standalone_mode=False)
    assert seen[-1] == ModelOptions()  # the command line's defaults are the library's


MODEL_FLAGS = ("--model", "--weights", "--no-pretrained", "--input-size", "--mean", "--std", "--device")


def _flags(command):
    return {opt: param for param in command.params for opt in param.opts}


def test_every_model_command_has_the_same_model_options():
    commands = {name: app.commands[name] for name in ("analyze", "explain", "layers", "bench")}
    seen = {}
    for name, command in commands.items():
        flags = _flags(command)
        for flag in MODEL_FLAGS:
            param = flags[flag]
            seen.setdefault(flag, set()).add((param.name, repr(param.default), param.help, param.show_default))
    assert all(len(variants) == 1 for variants in seen.values()), seen
    layers = {(p.help, p.multiple) for name in ("analyze", "bench") for p in [_flags(commands[name])["--layers"]]}
    assert len(layers) == 1


def test_layers_command_takes_the_model_options(capsys, tmp_path):
    import io

    import pandas as pd

    assert _cli("layers", "resnet18", "--no-pretrained", "--input-size", "64", "--format", "csv") == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("name")
    assert table.loc["layer4", "output"] == "512x2x2" and table.loc["layer1", "output"] == "64x16x16"  # 64 px / 32, / 4
    assert _cli("layers", "resnet18", "--input-size", "3,0,64") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input_size must be" in err
    assert _cli("layers", "resnet18", "--mean", "0.5,x,0.5") == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert _cli("analyze", "--model", "resnet18", "--device", "warp9", "--out", str(tmp_path / "report")) == 2
    assert "unknown device" in capsys.readouterr().err and not (tmp_path / "report").exists()


# --- dropped default stages in run.json and the summary; `alignscope models` ---------------------------


from test_layouts import _DroppedStages  # noqa: E402  (the same model with stages that give no map)


def test_cli_default_model_is_the_librarys():
    from alignscope.cli.options import DEFAULT_MODEL as CLI_DEFAULT
    from alignscope.model.build import DEFAULT_MODEL

    assert CLI_DEFAULT == DEFAULT_MODEL


def test_dropped_default_stages_reach_run_json_and_the_summary(images, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        report = alignscope.analyze(_DroppedStages().eval(), transforms=["hflip"], images=images, input_size=(3, 16, 16),
                                    batch_size=4)
    assert report.meta["layers"] == ["conv"]
    skipped = {entry["layer"]: entry["reason"] for entry in report.meta["layers_skipped"]}
    assert set(skipped) == {"pool", "stem"} and "no spatial extent" in skipped["pool"]
    assert "default stage 'pool' dropped" in caplog.text
    _print_summary(report, tmp_path)
    out = capsys.readouterr().out
    assert "layers left out (2, run.json layers_skipped): pool (output" in out and "stem (no module of this name" in out


def test_models_command_says_which_zoo_weights_are_missing(monkeypatch, capsys):
    from alignscope.model import offline_weights

    entry = offline_weights.offline_weights("tf_efficientnet_lite0")
    missing = replace(entry, name="tf_efficientnet_lite9", description="package efficientnet-lite9 (zoo extra)",
                      is_installed=lambda: False)
    monkeypatch.setitem(offline_weights._REGISTRY, missing.name, missing)
    assert _cli("models") == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["tf_efficientnet_lite9", "not", "installed:"] for line in lines)
    assert any(line.split()[:1] == ["tf_efficientnet_lite0"] and "not installed" not in line for line in lines)
