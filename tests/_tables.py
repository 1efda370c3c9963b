"""Synthetic alignment tables whose every number is chosen, for figure, page and gate tests."""
from __future__ import annotations

import numpy as np
import pandas as pd

from alignscope.report.report import REQUIRED_COLUMNS


def make_table(transforms=("identity", "rot90", "hflip"), layers=("stem", "mid", "deep"), model="net", pretrained=True,
               sweep="", magnitudes=None, value=None, n_images=8) -> pd.DataFrame:
    """One row per (layer, transform); aligned_error = value(t, d) (default 0.1*(t+1) + 0.01*d), identity 0.

    unaligned = aligned + 0.2, floor = aligned / 2, CI = aligned -+ 0.05.
    """
    rows = []
    for depth, layer in enumerate(layers, start=1):
        for t, spec in enumerate(transforms):
            aligned = 0.0 if spec == "identity" else (value(t, depth) if value else 0.1 * (t + 1) + 0.01 * depth)
            rows.append({
                "model": model, "layer": layer, "depth": depth, "module": "Conv2d", "channels": 4, "height": 8 // depth,
                "width": 8 // depth, "stride": 2.0 ** depth, "transform": spec, "exact": True, "n_images": n_images,
                "aligned_error": aligned, "aligned_error_std": 0.1, "aligned_error_ci_low": aligned - 0.05,
                "aligned_error_ci_high": aligned + 0.05, "unaligned_error": aligned + 0.2, "floor_error": aligned / 2,
                "aligned_cosine": 1 - aligned, "unaligned_error_ci_low": aligned + 0.15, "unaligned_error_ci_high": aligned + 0.25,
                "floor_error_ci_low": aligned / 2, "floor_error_ci_high": aligned / 2, "chance_distance": 10.0,
                "valid_fraction": 1.0, "mask": "none", "sweep": sweep,
                "magnitude": magnitudes[t] if magnitudes is not None else np.nan, "pretrained": pretrained,
            })
    table = pd.DataFrame(rows)
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    return table
