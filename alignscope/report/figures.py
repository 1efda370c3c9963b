"""All figures of a report, keyed by file stem: what ``report.save`` and ``alignscope plot`` draw.

The layer rows go to :mod:`alignscope.report.plots` (depth, heatmap, fitted, sweeps), the output
and placement rows to :mod:`alignscope.report.prediction_plots`; like them, only the table is read.
"""
from __future__ import annotations

import pandas as pd
from matplotlib import pyplot as plt

from .output_rows import layer_rows, output_rows, placement_rows
from .plots import depth_figure, fitted_figure, heatmap_figure, sweep_figures
from .prediction_plots import placement_figures, prediction_figure


def report_figures(table: pd.DataFrame) -> dict[str, plt.Figure]:
    """All figures of a report, keyed by file stem."""
    table = table.copy()
    if "sweep" not in table:
        table["sweep"] = ""
    table["sweep"] = table["sweep"].fillna("")
    predictions, placements = output_rows(table), placement_rows(table)
    table = layer_rows(table)
    figures = {"alignment_by_depth": depth_figure(table), "alignment_heatmap": heatmap_figure(table)}
    fitted = fitted_figure(table)
    if fitted is not None:
        figures["alignment_by_depth_fitted"] = fitted
    figures.update(sweep_figures(table))
    if len(predictions):
        figures["prediction"] = prediction_figure(predictions)
    if len(placements):
        figures.update(placement_figures(placements, predictions))
    return figures
