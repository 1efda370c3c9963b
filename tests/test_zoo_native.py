"""The whole analysis on one model of each timm family the docs name (docs/models.md), at the model's native input size.

Random weights, two bundled photos, the default layers (and ``layers="all"``
on two small models), rot90 (which uses the measured lattices) and
translate32,0. Each model must finish without an error, read its default
layers with the layouts docs/models.md lists, give them the channel counts
timm's ``feature_info`` states, and keep the lattices it is expected to have
(see ``tests/zoo_models.py``; random initialisation matters there: zero-initialised
residual branches keep ResNet's and LeViT's early supports local, SE blocks make
MobileNetV3's global). ``benchmarks/zoo_timing.py`` times the same runs.
"""
import logging

import numpy as np
import pytest
import timm

import alignscope
from zoo_models import ALL_LAYERS, TRANSFORMS, ZOO


def _analyze(name: str, layers=None):
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg
    report = alignscope.analyze(model, transforms=TRANSFORMS, max_images=2, batch_size=2, layers=layers,
                                input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"])
    return model, report


@pytest.mark.parametrize("name", list(ZOO))
def test_whole_analysis_at_native_size(name, caplog):
    expected = ZOO[name]
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        model, report = _analyze(name)
    table = report.table[report.table["kind"] == "layer"]
    layers = list(dict.fromkeys(table["layer"]))
    layouts = report.meta["layer_layouts"]
    kinds: dict[str, int] = {}
    for layer in layers:
        kind = layouts[layer]["layout"].split()[0]
        kind = "NLC" if kind == "tokens" and "(B,C,N)" not in layouts[layer]["layout"] else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == expected["layouts"], layouts
    # the channel count each default stage has, by timm's own account
    stated = {entry["module"]: entry["num_chs"] for entry in model.feature_info if "module" in entry}
    for row in table[table["transform"] == "rot90"].itertuples():
        module = row.layer.split("[")[0]
        if module in stated and "[" not in row.layer:
            assert row.channels == stated[module], (row.layer, row.channels, stated[module])
    assert table["aligned_error"].notna().all() and np.isfinite(table["aligned_error"]).all()
    assert table["n_images"].eq(2).all()
    rot = table[table["transform"] == "rot90"]
    with_lattice = int(rot["registered_error"].notna().sum())
    want = {"all": len(rot), "none": 0}.get(expected["lattice"])
    if want is None:
        assert 0 < with_lattice < len(rot), f"{with_lattice} of {len(rot)} layers have a lattice"
    else:
        assert with_lattice == want, f"{with_lattice} of {len(rot)} layers have a lattice"
    # a layer without a lattice is named, with its reason, in the log, the report's warnings and run.json
    missing = set(rot.loc[rot["registered_error"].isna(), "layer"])
    assert set(report.meta["no_lattice"]) == missing
    if missing:
        sentence = next(w for w in report.warnings() if w.startswith("no lattice measured"))
        assert all(layer in sentence for layer in missing), sentence
        assert any(sentence in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_every_layer_of_a_small_model(name):
    _, report = _analyze(name, layers="all")
    table = report.table[report.table["kind"] == "layer"]
    assert table["layer"].nunique() > 20
    # random weights leave some layers at exactly zero (zero-initialised residual branches): those rows measure
    # no image, and say so with NaN, never with a number
    measured = table["n_images"] > 0
    assert measured.mean() > 0.8
    assert np.isfinite(table.loc[measured, "aligned_error"]).all()
    assert table.loc[~measured, "aligned_error"].isna().all()
