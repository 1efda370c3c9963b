"""Figures read back from their matplotlib objects: panels, ticks, titles and lines against the table they drew."""
import logging

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _tables import make_table

from alignscope.report.comparison import combine_runs, comparison_table, overlap
from alignscope.report.figures import report_figures
from alignscope.report.plots import depth_figure, depth_rows, heatmap_figure, sweep_figures
from alignscope.report.verdicts import verdicts


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _panels(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


def _thick_lines(ax):
    """The aligned lines (drawn thickest) of a depth panel."""
    return [line for line in ax.get_lines() if line.get_linewidth() >= 1.5]


def test_depth_figure_one_panel_per_transform_without_identity_and_sweeps():
    table = pd.concat([make_table(("identity", "rot90", "hflip", "scale0.8")),
                       make_table(("rotate0", "rotate45"), sweep="rotate:0:45:45", magnitudes=(0, 45))])
    fig = depth_figure(table)
    panels = _panels(fig)
    assert set(panels) == {"rot90", "hflip", "scale0.8"}  # identity and sweep rows left out
    for spec, ax in panels.items():
        (line,) = _thick_lines(ax)
        expected = table[(table["transform"] == spec) & (table["sweep"] == "")].sort_values("depth")
        assert np.allclose(line.get_xdata(), [1, 2, 3])
        assert np.allclose(line.get_ydata(), expected["aligned_error"])
    shared_y = {ax.get_ylim() for ax in panels.values()}
    assert len(shared_y) == 1  # shared axes


def test_depth_figure_stays_readable_with_twenty_transforms():
    specs = [f"rotate{5 * i}" for i in range(1, 21)]
    fig = depth_figure(make_table(tuple(specs)))
    panels = _panels(fig)
    assert len(panels) == 20
    assert all(len(_thick_lines(ax)) == 1 for ax in panels.values())  # one aligned line per panel, none overlap


def test_layer_ticks_are_integer_depths_named_by_layer():
    fig = depth_figure(make_table(layers=("conv1", "layer2", "head")))
    ax = _panels(fig)["rot90"]
    assert list(ax.get_xticks()) == [1, 2, 3]
    fig.canvas.draw()
    lowest = [ax for ax in fig.axes if ax.get_visible() and any(t.get_text() for t in ax.get_xticklabels())]
    assert lowest and [t.get_text() for t in lowest[0].get_xticklabels()] == ["conv1", "layer2", "head"]


def test_compare_ticks_name_both_models_layers():
    a = make_table(model="a", layers=("s1", "s2"))
    b = make_table(model="b", layers=("l1", "l2"))
    fig = depth_figure(pd.concat([a, b]))
    fig.canvas.draw()
    labels = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
    assert {"s1 / l1", "s2 / l2"} <= labels


def test_random_weights_marked_in_every_title():
    random = make_table(pretrained=False)
    figures = report_figures(pd.concat([random, make_table(("rotate0", "rotate45"), sweep="rotate:0:45:45",
                                                           magnitudes=(0, 45), pretrained=False)]))
    assert set(figures) >= {"alignment_by_depth", "alignment_heatmap", "sweep_rotate_0_45_45"}
    for stem, fig in figures.items():
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        assert any("RANDOM WEIGHTS" in t for t in titles), stem
    for fig in report_figures(make_table()).values():
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        assert not any("RANDOM" in t for t in titles)


def test_heatmap_drops_the_identity_row():
    fig = heatmap_figure(make_table(("identity", "rot90", "hflip")))
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert rows == ["rot90", "hflip"]


@pytest.mark.parametrize("family, values, unit", [("rotate", (-30, 0, 30, 60), "degrees"), ("scale", (0.5, 1.0, 2.0), "scale factor"),
                                                  ("translate", (0, 8, 16), "pixels")])
def test_sweep_plot_has_units_sampled_ticks_and_floor(family, values, unit):
    specs = tuple(f"{family}{v}" for v in values)
    sweep = f"{family}:{values[0]}:{values[-1]}:1"
    table = make_table(specs, sweep=sweep, magnitudes=values)
    (fig,) = sweep_figures(table).values()
    aligned, unaligned, floor = fig.axes[:3]
    assert unit in aligned.get_xlabel()
    assert np.allclose(aligned.get_xticks(), values)
    assert "floor" in floor.get_title()
    deep = table[table["layer"] == "deep"].sort_values("magnitude")
    ys = [line.get_ydata() for line in floor.get_lines() if line.get_label() == "deep"]
    assert len(ys) == 1 and np.allclose(ys[0], deep["floor_error"])


def test_floor_above_aligned_is_circled_and_said_in_the_verdict():
    table = make_table(("scale1.25", "rot90"))
    table.loc[(table["transform"] == "scale1.25") & (table["layer"] == "deep"), "floor_error"] = 0.9  # aligned 0.13
    fig = depth_figure(table)
    panels = _panels(fig)
    circles = [c for c in panels["scale1.25"].collections if c.get_offsets().shape[0] and c.get_facecolor().size == 0]
    assert len(circles) == 1 and np.allclose(circles[0].get_offsets(), [[3, 0.9]])
    assert not [c for c in panels["rot90"].collections if c.get_offsets().shape[0] and c.get_facecolor().size == 0]
    assert "not a lower bound" in fig.get_supxlabel()
    lines = dict(zip(["scale1.25", "rot90"], verdicts(table)))
    assert "floor is above the aligned error at deep (0.90 > 0.13)" in lines["scale1.25"]
    assert "floor" not in lines["rot90"].split(")")[-1]


def test_compare_keeps_a_run_with_only_sweep_rows():
    plain = make_table(("rot90", "rotate45"), model="a")
    swept = make_table(("rotate0", "rotate45", "rotate90"), model="b", sweep="rotate:0:90:45", magnitudes=(0, 45, 90))
    combined = pd.concat([plain, swept], ignore_index=True)
    shown = depth_rows(combined)
    assert set(shown["model"]) == {"a", "b"}
    assert set(shown.loc[shown["model"] == "b", "transform"]) == {"rotate0", "rotate45", "rotate90"}
    fig = depth_figure(combined)
    assert len(_thick_lines(_panels(fig)["rotate45"])) == 2  # both runs meet on rotate45
    legends = [lg for lg in fig.legends if lg.get_title().get_text() == "model"]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["a", "b"]


def test_compare_of_disjoint_runs_warns_once_and_gives_no_nan_table(caplog):
    combined = combine_runs([make_table(("rot90",), model="m"), make_table(("hflip",), model="m")], ["r1/alignment.csv", "r2/alignment.csv"])
    from alignscope.report.comparison import run_sizes

    assert run_sizes(combined) == {"m (r1)": 8, "m (r2)": 8}
    assert list(dict.fromkeys(combined["model"])) == ["m (r1)", "m (r2)"]  # both runs labelled, not only the second
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        wide = comparison_table(combined)
    assert wide.empty
    (record,) = caplog.records
    assert "share no transform" in record.getMessage() and "\n" not in record.getMessage()


def test_compare_table_keeps_only_shared_transforms(caplog):
    combined = combine_runs([make_table(("rot90", "hflip"), model="a"), make_table(("rot90",), model="b")], ["x/a.csv", "y/b.csv"])
    found = overlap(combined)
    assert found.shared == ["rot90"] and found.partial == {"hflip": ["a"]}
    with caplog.at_level(logging.WARNING, logger="alignscope"):
        wide = comparison_table(combined)
    assert not wide.isna().any().any() and list(wide.columns) == ["layer", "a", "b", "difference", "intervals_overlap"]
    assert set(wide.index.get_level_values("transform")) == {"rot90"}
    assert list(wide["layer"]) == ["stem", "mid", "deep"]  # both runs name their layers alike
    assert (wide["difference"] == wide["b"] - wide["a"]).all() and wide["intervals_overlap"].all()  # identical runs
    assert "hflip only in a" in caplog.records[0].getMessage()


def test_compare_keeps_a_run_without_any_number():
    # e.g. a run on copies of one photo: every row NaN with why_missing; its column stays, the difference is unknown
    empty = make_table(("rot90",), model="b")
    for column in [c for c in empty.columns if c.startswith("aligned_error")]:
        empty[column] = float("nan")
    wide = comparison_table(combine_runs([make_table(("rot90",), model="a"), empty], ["x/a.csv", "y/b.csv"]))
    assert list(wide.columns) == ["layer", "a", "b", "difference", "intervals_overlap"]
    assert wide["b"].isna().all() and wide["difference"].isna().all() and wide["intervals_overlap"].isna().all()
    assert wide["a"].notna().all()


def test_compare_meets_a_sweep_value_of_one_run_with_a_plain_transform_of_another():
    a = pd.concat([make_table(("rot90",), model="a"),
                   make_table(("rotate0", "rotate45", "rotate90"), model="a", sweep="rotate:0:90:45", magnitudes=(0, 45, 90))])
    b = make_table(("rotate45",), model="b")
    shown = depth_rows(pd.concat([a, b], ignore_index=True))
    assert sorted(set(zip(shown["model"], shown["transform"]))) == [("a", "rot90"), ("a", "rotate45"), ("b", "rotate45")]
    assert set(depth_rows(a)["transform"]) == {"rot90"}  # alone, a's sweep stays in its sweep plot


def test_a_sweep_value_that_is_the_identity_gets_no_panel():
    table = make_table(("rotate0", "rotate45"), sweep="rotate:0:45:45", magnitudes=(0, 45))
    table.loc[table["transform"] == "rotate0", ["aligned_error", "unaligned_error", "floor_error"]] = 0.0
    assert set(_panels(depth_figure(table))) == {"rotate45"}
    assert [t.get_text() for t in heatmap_figure(table).axes[0].get_yticklabels()] == ["rotate45"]


def test_runs_of_one_model_in_folders_of_one_name_stay_apart_and_output_rows_are_compared():
    from alignscope.report.comparison import prediction_comparison

    def with_output(model, agreement):
        table = make_table(("rot90",), model=model).assign(kind="layer")
        output = table.iloc[:1].assign(kind="output", layer="output", aligned_error=float("nan"),
                                       prediction_agreement=agreement, depth=99)
        return pd.concat([table, output], ignore_index=True)

    combined = combine_runs([with_output("m", 0.5), with_output("m", 0.75), with_output("n", 1.0)],
                            ["a/run/alignment.csv", "b/run/alignment.csv", "c/other/alignment.csv"])
    labels = list(dict.fromkeys(combined["model"]))
    assert len(labels) == 3 and labels[2] == "n" and all(label.startswith("m (") for label in labels[:2])
    wide = prediction_comparison(combined)
    assert list(wide.index) == ["rot90"] and list(wide.iloc[0]) == [0.5, 0.75, 1.0]
    assert "output" not in set(comparison_table(combined).index.get_level_values("depth").astype(str))
    assert prediction_comparison(make_table(("rot90",), model="x")).empty
    partial = combine_runs([with_output("m", 0.5), make_table(("hflip",), model="n").assign(kind="layer")],
                           ["a/alignment.csv", "b/alignment.csv"])
    assert prediction_comparison(partial).empty  # rot90 is not in every run: left out here as in the layer table
