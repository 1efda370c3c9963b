"""Saved STN experiments: read one back, or combine several made with one recipe into one comparison."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from ..errors import ImageError, UsageError
from .data import FixedTestSet, load_data
from .experiment import CURVE_COLUMNS, MODELS_FILE, STNExperiment
from .models import STNClassifier

# settings that must agree for saved runs to be combined into one comparison
COMBINE_KEYS = ("data_spec", "task", "classifier", "warp", "optimizer", "lr", "loc_lr_multiplier", "loc_weight_decay",
                "iterations", "batch_size", "decay_at", "decay_factor", "ramp", "schedule", "test_passes", "data_seed")


def load_experiment(folder: str | Path) -> STNExperiment:
    """A saved run (``STNExperiment.save``) read back; the test set is rebuilt from its settings when they name the data."""
    folder = Path(folder)
    needed = ("stn_results.csv", "stn_alignment.csv", "stn_angles.csv", "run.json")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{folder} is not a saved STN run: it lacks {', '.join(missing)}")
    settings = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    models = {}
    if (folder / MODELS_FILE).is_file():
        for variant, saved in torch.load(folder / MODELS_FILE, weights_only=True).items():
            model = STNClassifier(variant, saved["n_classes"], saved["warp"], saved["classifier"])
            model.load_state_dict(saved["state_dict"])
            models[variant] = model.eval()
    test = upright = None
    if settings.get("data_spec"):
        try:
            upright = load_data(settings["data_spec"], settings["data_seed"])
        except (ImageError, UsageError, OSError) as error:
            # the results stand without the images; only the pictures of the learned warps need them
            settings["test_set_missing"] = f"the run's data {settings['data_spec']} cannot be read here ({error})"
            upright = None
    if upright is not None:
        test = FixedTestSet.make(upright.test_images, upright.test_labels, settings["task"], settings["test_passes"],
                                 seed=10_000 + settings["data_seed"])
    curves = pd.read_csv(folder / "stn_curves.csv") if (folder / "stn_curves.csv").is_file() else \
        pd.DataFrame(columns=CURVE_COLUMNS)
    return STNExperiment(pd.read_csv(folder / "stn_results.csv"), pd.read_csv(folder / "stn_alignment.csv"),
                         pd.read_csv(folder / "stn_angles.csv"), settings, models, test, curves)


def combine_experiments(parts: Sequence[STNExperiment]) -> STNExperiment:
    """Runs of different variants (or seeds) made with one recipe, as one comparison.

    Refuses parts whose recipe, data or task differ (``COMBINE_KEYS``) or that
    repeat a (variant, seed): those would not be one experiment.
    """
    if not parts:
        raise UsageError("nothing to combine")
    first = parts[0].settings
    for part in parts[1:]:
        differ = [k for k in COMBINE_KEYS if json.dumps(part.settings.get(k)) != json.dumps(first.get(k))]
        if differ:
            raise UsageError("runs made with different settings cannot be combined: " + ", ".join(
                f"{k} {first.get(k)!r} against {part.settings.get(k)!r}" for k in differ))
    results = pd.concat([p.results for p in parts], ignore_index=True)
    repeated = results[results.duplicated(["variant", "seed"])]
    if len(repeated):
        raise UsageError(f"runs to combine repeat variant {repeated['variant'].iloc[0]} seed {repeated['seed'].iloc[0]}")
    variants = list(dict.fromkeys(results["variant"]))
    seeds = results.groupby("variant")["seed"].count()
    settings = {**first, "variants": variants, "seeds": int(seeds.max()),
                "combined_from": [p.settings.get("variants") for p in parts],
                # the runs' training seconds added up: the CPU work, not the wall clock of parallel runs
                "training_seconds_summed": float(results["seconds"].sum())}
    models = {v: m for p in parts for v, m in p.models.items()}
    return STNExperiment(results, pd.concat([p.alignment for p in parts], ignore_index=True),
                         pd.concat([p.angles for p in parts if len(p.angles)], ignore_index=True)
                         if any(len(p.angles) for p in parts) else parts[0].angles,
                         settings, models, next((p.test for p in parts if p.test is not None), None),
                         pd.concat([p.curves for p in parts if len(p.curves)], ignore_index=True)
                         if any(len(p.curves) for p in parts) else parts[0].curves)
