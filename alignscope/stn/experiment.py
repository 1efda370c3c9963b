"""The STN placement experiment: train every variant with several seeds, evaluate, save.

For each (variant, seed): train (:mod:`alignscope.stn.train`) on freshly
transformed training images, then evaluate (:mod:`alignscope.stn.evaluate`)
on the fixed random test set: accuracy averaged over the test passes, the
angle metric and the alignment at the STN output and after each layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from ..errors import UsageError
from ..files import publish_folder
from .data import TASKS, FixedTestSet, UprightData, load_data
from .evaluate import evaluate
from .models import WARPS, STNClassifier, check_variant, spatial_transform
from .train import TrainConfig, parameter_counts, train_variant

QUICK = {"seeds": 1, "iterations": 150, "batch_size": 64, "test_passes": 2, "variants": ("none", "input", "features@1", "shared@1", "deep@1")}


@dataclass
class STNExperiment:
    """``results``: one row per (variant, seed); ``alignment``: per (variant, seed, layer); ``angles``: per test image
    of pass 0 (variant, seed, label, true_deg, warp_deg)."""

    results: pd.DataFrame
    alignment: pd.DataFrame
    angles: pd.DataFrame
    settings: dict
    models: dict[str, STNClassifier] = field(default_factory=dict)  # seed-0 model per variant, for pictures
    test: FixedTestSet | None = None

    def summary(self) -> pd.DataFrame:
        """Per variant: mean and std across seeds of accuracy and the angle metric, and the alignment at the STN."""
        grouped = self.results.groupby("variant", sort=False)
        table = pd.DataFrame({
            "parameters": grouped["parameters"].first(),
            "localization_parameters": grouped["localization_parameters"].first(),
            "seeds": grouped["seed"].count(),
            "test_accuracy_mean": grouped["test_accuracy"].mean(),
            "test_accuracy_std": grouped["test_accuracy"].std(ddof=1),
            "angle_std_deg_mean": grouped["angle_std_deg"].mean(),
            "angle_std_deg_std": grouped["angle_std_deg"].std(ddof=1),
            "deming_slope_mean": grouped["deming_slope"].mean(),
            "deming_slope_std": grouped["deming_slope"].std(ddof=1),
        })
        if len(self.alignment):
            at = self.alignment.groupby(["variant", "layer"])["alignment_error"].mean()
            last = self.alignment["layer"].iloc[-1]
            table["alignment_at_stn"] = [at.get((v, "stn"), math.nan) for v in table.index]
            table["alignment_last_layer"] = [at.get((v, last), math.nan) for v in table.index]
        return table.reindex(list(dict.fromkeys(self.results["variant"]))).reset_index(names="variant")

    def figures(self) -> dict:
        from .plots import accuracy_figure, angle_figure, warp_grid_figure

        figures = {"stn_accuracy": accuracy_figure(self)}
        if len(self.angles):
            figures["stn_angles"] = angle_figure(self)
        if self.models and self.test is not None:
            figures["stn_warps"] = warp_grid_figure(self)
        return figures

    def save(self, out: str | Path, force: bool = False) -> Path:
        def write(folder: Path) -> None:
            from ..plots import save_figures

            self.results.to_csv(folder / "stn_results.csv", index=False)
            self.alignment.to_csv(folder / "stn_alignment.csv", index=False)
            self.angles.to_csv(folder / "stn_angles.csv", index=False)
            self.summary().to_csv(folder / "stn_summary.csv", index=False)
            (folder / "run.json").write_text(json.dumps(self.settings, indent=2, default=str), encoding="utf-8")
            save_figures(self.figures(), folder)

        return publish_folder(Path(out), write, force, kind="stn")


def run_experiment(
    data: str | UprightData = "digits",
    task: str = "rotate",
    variants: Sequence[str] = ("none", "input", "features@1", "features@2", "shared@2", "deep@2"),
    seeds: int = 3,
    config: TrainConfig = TrainConfig(),
    classifier: str = "small",
    warp: str = "affine",
    test_passes: int = 10,
    data_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> STNExperiment:
    """Train each variant with seeds 0..seeds-1 and evaluate it (see the module docstring).

    ``progress(done, total)`` counts training steps over the whole experiment;
    ``log(line)`` gets one line per finished run.
    """
    if task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if warp not in WARPS:
        raise UsageError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
    if seeds < 1 or not variants:
        raise UsageError("need at least one variant and one seed")
    for variant in variants:
        check_variant(variant, classifier)
    upright = load_data(data, data_seed) if isinstance(data, str) else data
    test = FixedTestSet.make(upright.test_images, upright.test_labels, task, test_passes, seed=10_000 + data_seed)
    total = len(variants) * seeds * config.iterations
    rows, alignment_rows, angle_frames, models = [], [], [], {}
    for v_index, variant in enumerate(variants):
        for seed in range(seeds):
            done_before = (v_index * seeds + seed) * config.iterations
            on_step = None if progress is None else (lambda step, base=done_before: progress(base + step, total))
            result = train_variant(variant, upright.train_images, upright.train_labels, task, seed, config, classifier,
                                   warp, len(upright.classes), on_step)
            found = evaluate(result.model, test)
            tail = result.losses[-min(50, len(result.losses)):]
            rows.append({"variant": variant, "classifier": classifier, "task": task, "seed": seed,
                         **parameter_counts(result.model), **found.metrics,
                         "final_train_loss": sum(tail) / len(tail), "iterations": config.iterations,
                         "seconds": round(result.seconds, 2)})
            for layer, values in found.alignment.items():
                alignment_rows.append({"variant": variant, "seed": seed, "layer": layer,
                                       "alignment_error": values["aligned_error"],
                                       "alignment_error_ci_low": values["aligned_error_ci_low"],
                                       "alignment_error_ci_high": values["aligned_error_ci_high"],
                                       "n_images": int(values["aligned_error_n"])})
            if len(found.angles):
                angle_frames.append(found.angles.assign(variant=variant, seed=seed))
            if seed == 0:
                models[variant] = result.model
            if log is not None:
                m = found.metrics
                log(f"{variant} seed {seed}: test accuracy {m['test_accuracy']:.3f}, angle std {m['angle_std_deg']:.1f} deg, "
                    f"Deming slope {m['deming_slope']:.2f} ({result.seconds:.0f} s)")
    angle_columns = ["variant", "seed", "label", "true_deg", "warp_deg"]
    angles = pd.concat(angle_frames, ignore_index=True)[angle_columns] if angle_frames else pd.DataFrame(columns=angle_columns)
    settings = {"data": upright.source, "task": task, "classifier": classifier, "variants": list(variants),
                "seeds": seeds, "warp": warp, **config.as_dict(), "test_passes": test_passes, "data_seed": data_seed,
                "train_images": len(upright.train_labels), "test_images": len(upright.test_labels),
                "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return STNExperiment(pd.DataFrame(rows), pd.DataFrame(alignment_rows), angles, settings, models, test)


@torch.inference_mode()
def warped_inputs(model: STNClassifier, images: torch.Tensor) -> torch.Tensor:
    """What the learned warp does to ``images``; for ``features@k`` the warp of layer k's map drawn on the image."""
    model.eval()
    theta = model.predict_theta(images)
    return images if theta is None else spatial_transform(images, theta)
