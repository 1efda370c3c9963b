"""The summary grid: cells marked from their 95% interval, one screen wide, the same in the terminal and report.html."""
from __future__ import annotations

import math

import pandas as pd

from alignscope.report.grid import (ALIGNED_BELOW, NOT_ALIGNED_ABOVE, SummaryGrid, cell_class, images_needed,
                                    short_name, short_verdicts)
from _tables import make_table


def _row(value, low, high):
    return pd.Series({"aligned_error": value, "aligned_error_ci_low": low, "aligned_error_ci_high": high})


def test_a_cell_is_aligned_only_when_its_whole_interval_is_below_the_threshold():
    assert cell_class(_row(0.1, 0.05, ALIGNED_BELOW - 0.01)) == "aligned"
    assert cell_class(_row(0.1, 0.05, ALIGNED_BELOW + 0.01)) == "partly"  # the mean alone would say aligned
    assert cell_class(_row(0.8, NOT_ALIGNED_ABOVE + 0.01, 0.9)) == "not aligned"
    assert cell_class(_row(0.8, NOT_ALIGNED_ABOVE - 0.01, 0.9)) == "partly"
    assert cell_class(_row(math.nan, math.nan, math.nan)) == "missing"
    assert cell_class(_row(0.1, math.nan, math.nan)) == "aligned"  # one image: the value itself


def test_grid_rows_are_transforms_and_columns_layers_in_depth_order():
    table = make_table(transforms=("identity", "rot90", "hflip"), layers=("stem", "mid", "deep"))
    grid = SummaryGrid.from_table(table.sample(frac=1, random_state=0))
    assert grid.transforms == ["rot90", "hflip"] or set(grid.transforms) == {"rot90", "hflip"}  # identity omitted
    assert grid.layers == ["stem", "mid", "deep"]
    value, kind = grid.cells["rot90"]["mid"]
    row = table[(table["transform"] == "rot90") & (table["layer"] == "mid")].iloc[0]
    assert value == row["aligned_error"] and kind == cell_class(row)


def test_the_grid_fits_80_columns_and_wraps_many_layers():
    layers = tuple(f"blocks.{i}" for i in range(12))
    table = make_table(transforms=("translate16,0", "rot90", "hflip", "scale1.25"), layers=layers)
    text = SummaryGrid.from_table(table).text(80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("transform") >= 2  # a second block for the layers that did not fit
    assert all(short_name(layer, 8) in text for layer in layers)


def test_short_verdicts_are_one_line_each_of_at_most_100_characters():
    table = make_table(transforms=("identity", "rot90", "hflip"), layers=tuple(f"stage.{i}" for i in range(9)))
    lines = short_verdicts(table)
    assert len(lines) == 2 and all(len(line) <= 100 for line in lines)
    assert lines[0].startswith("rot90: ") and "worst" in lines[0]


def test_small_samples_are_said_with_the_images_that_would_separate_the_transforms():
    wide = make_table(transforms=("rot90", "hflip", "scale0.8"), n_images=4,
                      value=lambda t, d: 0.5 + 0.02 * t)  # means 0.02 apart, intervals 0.1 wide: all overlap
    overlapping, pairs, needed = images_needed(wide)
    assert overlapping == pairs == 3 and needed > 4
    separated = make_table(transforms=("rot90", "hflip", "scale0.8"), value=lambda t, d: 0.2 + 0.3 * t)
    assert images_needed(separated) is None


def test_the_html_grid_has_the_same_cells_with_their_class():
    table = make_table(transforms=("rot90", "hflip"))
    page = SummaryGrid.from_table(table).html()
    assert page.count("<tr>") == 3 and "grid-" in page
    for _, row in table.iterrows():
        assert f"{row['aligned_error']:.2f}" in page
