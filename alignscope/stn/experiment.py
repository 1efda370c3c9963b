"""The STN placement experiment: train every variant on a task, measure accuracy and alignment.

For each (variant, seed): train (see :mod:`alignscope.stn.train`), record
parameter counts, train/test accuracy, epochs and seconds. Then the
alignment behind the accuracy: for every test digit, its upright version x
and its transformed version g x (the task's own g, known per image) go
through the trained model; at the STN's output (``stn``, the insertion
point) and after each block, the distance between the maps of g x and of x
is divided by the chance distance (x against another test digit), as in
:func:`alignscope.analyze`. An STN that undoes g brings this towards 0 from
the insertion point on; ``none`` gives the unaided network's numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from ..errors import UsageError
from ..metrics import AlignmentStatistic, pair_distances
from ..report import publish_folder
from .data import DigitSplits, load_splits
from .models import VARIANTS, WARPS, STNClassifier, spatial_transform
from .train import parameter_counts, train_variant

QUICK = {"seeds": 1, "epochs": 12}


@dataclass
class STNExperiment:
    """Results: ``results`` one row per (variant, seed), ``alignment`` one row per (variant, seed, layer)."""

    results: pd.DataFrame
    alignment: pd.DataFrame
    settings: dict
    models: dict[str, STNClassifier] = field(default_factory=dict)  # seed-0 model per variant, for pictures
    splits: DigitSplits | None = None

    def summary(self) -> pd.DataFrame:
        """Mean and std across seeds per variant, with the alignment error after the last block."""
        last = self.alignment[self.alignment["layer"] == "block4"].groupby("variant")["alignment_error"].mean()
        at_stn = self.alignment[self.alignment["layer"] == "stn"].groupby("variant")["alignment_error"].mean()
        grouped = self.results.groupby("variant", sort=False)
        table = pd.DataFrame({
            "parameters": grouped["parameters"].first(),
            "test_accuracy_mean": grouped["test_accuracy"].mean(),
            "test_accuracy_std": grouped["test_accuracy"].std(ddof=1),
            "train_accuracy_mean": grouped["train_accuracy"].mean(),
            "seeds": grouped["seed"].count(),
            "alignment_at_stn": at_stn,
            "alignment_after_block4": last,
        })
        return table.reindex(list(dict.fromkeys(self.results["variant"]))).reset_index(names="variant")

    def figures(self) -> dict:
        from .plots import accuracy_figure, warp_grid_figure

        figures = {"stn_accuracy": accuracy_figure(self)}
        if self.models and self.splits is not None:
            figures["stn_warps"] = warp_grid_figure(self)
        return figures

    def save(self, out: str | Path, force: bool = False) -> Path:
        def write(folder: Path) -> None:
            from ..plots import save_figures

            self.results.to_csv(folder / "stn_results.csv", index=False)
            self.alignment.to_csv(folder / "stn_alignment.csv", index=False)
            self.summary().to_csv(folder / "stn_summary.csv", index=False)
            (folder / "run.json").write_text(json.dumps(self.settings, indent=2, default=str), encoding="utf-8")
            save_figures(self.figures(), folder)

        return publish_folder(Path(out), write, force, kind="stn")


@torch.no_grad()
def measure_alignment(model: STNClassifier, upright: torch.Tensor, transformed: torch.Tensor, batch_size: int = 256) -> dict[str, dict]:
    """Per layer: mean and 95% CI of ||F(g x) - F(x)|| / ||F(x) - F(x_other)|| over the images."""
    model.eval()
    stats: dict[str, AlignmentStatistic] = {}
    for start in range(0, len(upright), batch_size):
        a_maps = model.stages(upright[start : start + batch_size])
        b_maps = model.stages(transformed[start : start + batch_size])
        for layer, a in a_maps.items():
            if a.shape[0] < 2:
                continue
            b = b_maps[layer]
            values = pair_distances(reference=a, aligned=b, unaligned=b, other=torch.roll(a, 1, 0),
                                    mask=torch.ones(a.shape[-2:]))
            stats.setdefault(layer, AlignmentStatistic()).update(values)
    return {layer: stat.compute() for layer, stat in stats.items()}


def run_experiment(
    task: str = "rotate",
    variants: Sequence[str] = VARIANTS,
    seeds: int = 3,
    epochs: int = 40,
    warp: str = "affine",
    images: str | Path | None = None,
    data_seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> STNExperiment:
    """Train each variant with seeds 0..seeds-1 on the task's fixed split; see the module docstring."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown STN variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if warp not in WARPS:
        raise UsageError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
    if seeds < 1 or epochs < 1:
        raise UsageError("seeds and epochs must be at least 1")
    splits = load_splits(task, data_seed, images)
    n_classes = len(splits.classes)
    rows, alignment_rows, models = [], [], {}
    for variant in variants:
        for seed in range(seeds):
            result = train_variant(variant, splits.train_images, splits.train_labels, splits.test_images,
                                   splits.test_labels, seed=seed, epochs=epochs, warp=warp, n_classes=n_classes)
            rows.append({"variant": variant, "task": task, "seed": seed, **parameter_counts(result.model),
                         "test_accuracy": result.test_accuracy, "train_accuracy": result.train_accuracy,
                         "epochs": epochs, "seconds": round(result.seconds, 2), "final_loss": result.losses[-1]})
            for layer, values in measure_alignment(result.model, splits.test_upright, splits.test_images).items():
                alignment_rows.append({"variant": variant, "task": task, "seed": seed, "layer": layer,
                                       "alignment_error": values["aligned_error"],
                                       "alignment_error_ci_low": values["aligned_error_ci_low"],
                                       "alignment_error_ci_high": values["aligned_error_ci_high"],
                                       "n_images": int(values["aligned_error_n"])})
            if seed == 0:
                models[variant] = result.model
            if progress is not None:
                progress(f"{variant} seed {seed}: test accuracy {result.test_accuracy:.3f} ({result.seconds:.1f} s)")
    settings = {"task": task, "variants": list(variants), "seeds": seeds, "epochs": epochs, "warp": warp,
                "images": "scikit-learn digits" if images is None else str(images), "data_seed": data_seed,
                "train_images": len(splits.train_labels), "test_images": len(splits.test_labels),
                "torch": torch.__version__}
    return STNExperiment(pd.DataFrame(rows), pd.DataFrame(alignment_rows), settings, models, splits)


@torch.no_grad()
def warped_inputs(model: STNClassifier, images: torch.Tensor) -> torch.Tensor:
    """What the learned warp does to ``images``; for ``features@k`` the same warp drawn on the image."""
    model.eval()
    theta = model.predict_theta(images) if model.warps_input else None
    if model.variant.startswith("features@"):
        h = images
        for block in model.blocks[: model.k]:
            h = block(h)
        theta = model.localization(h)
    return images if theta is None else spatial_transform(images, theta)
