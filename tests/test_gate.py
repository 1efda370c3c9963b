"""The gate: rows breaking numeric limits, from the API, the check command and analyze --fail-above."""
import math

import pandas as pd
import pytest
from _tables import make_table

from alignscope.cli.main import main
from alignscope.errors import UsageError
from alignscope.report.gate import check, parse_limit
from alignscope.report.report import AlignmentReport


def cli(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


@pytest.fixture()
def table():
    # aligned_error = 0.1 * (t + 1) + 0.01 * depth: rot90 0.21..0.23, hflip 0.31..0.33, identity 0
    return make_table(("identity", "rot90", "hflip"), layers=("stem", "mid", "deep"))


def test_max_returns_exactly_the_rows_above_the_limit(table):
    failing = check(table, max={"aligned_error": 0.3})
    assert sorted(zip(failing["layer"], failing["transform"])) == [("deep", "hflip"), ("mid", "hflip"), ("stem", "hflip")]
    assert failing["breaks"].str.startswith("aligned_error 0.3").all()
    assert check(table, max=["aligned_error=0.5"]).empty
    assert len(check(table, max="aligned_error=0.22")) == 1 + 3  # rot90 at deep (0.23) and every hflip


def test_min_filters_and_several_limits(table):
    failing = check(table, min={"aligned_cosine": 0.8}, max={"aligned_error": 0.32}, layers=["deep"], transforms=["hflip", "rot*"])
    assert list(failing["transform"]) == ["rot90", "hflip"]
    assert failing.set_index("transform").loc["hflip", "breaks"] == "aligned_error 0.33 > 0.32; aligned_cosine 0.67 < 0.8"


def test_nan_breaks_the_limit(table):
    table.loc[(table["layer"] == "mid") & (table["transform"] == "rot90"), "aligned_error"] = math.nan
    failing = check(table, max={"aligned_error": 10})
    assert list(failing["breaks"]) == ["aligned_error is NaN (cannot be checked)"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"max": {"aligned_eror": 0.5}}, "no column 'aligned_eror'"),
    ({"max": {"transform": 0.5}}, "not numeric"),
    ({"max": ["aligned_error"]}, "not COLUMN=NUMBER"),
    ({"max": ["aligned_error=abc"]}, "not COLUMN=NUMBER"),
    ({}, "no limit given"),
    ({"max": {"aligned_error": 0.5}, "layers": ["blocks.9"]}, "layer 'blocks.9' matches no row"),
    ({"max": {"aligned_error": 0.5}, "transforms": ["rot91"]}, "transform 'rot91' matches no row"),
])
def test_a_typo_never_passes_the_gate(table, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        check(table, **kwargs)


def test_parse_limit():
    assert parse_limit("prediction_agreement=0.9") == ("prediction_agreement", 0.9)
    with pytest.raises(UsageError, match="--min"):
        parse_limit("=3", "--min")


def test_report_check_is_the_same_gate(table):
    report = AlignmentReport(table=table)
    assert report.check(max={"aligned_error": 0.3}).equals(check(table, max={"aligned_error": 0.3}))


def test_check_command_exit_codes(table, tmp_path, capsys):
    csv = tmp_path / "alignment.csv"
    table.to_csv(csv, index=False)
    assert cli("check", str(csv), "--max", "aligned_error=0.3") == 1
    captured = capsys.readouterr()
    assert captured.out.count("hflip") == 3 and "rot90" not in captured.out
    assert "3 of 9 checked rows break the limits" in captured.err
    assert cli("check", str(csv), "--max", "aligned_error=0.5", "--min", "aligned_cosine=0.5") == 0
    assert "all 9 checked rows are within the limits" in capsys.readouterr().err
    assert cli("check", str(csv), "--max", "aligned_error=0.3", "--transforms", "rot90", "--layers", "deep") == 0
    assert cli("check", str(csv), "--max", "aligned_eror=0.3") == 2
    assert cli("check", str(csv)) == 2
    assert cli("check", str(tmp_path / "none.csv"), "--max", "aligned_error=1") == 2


def test_analyze_fail_above(tmp_path, capsys):
    common = ("--transform", "rot180", "--max-images", "2", "--layers", "blocks.6", "--no-plots", "-q")
    assert cli("analyze", *common, "--out", str(tmp_path / "a"), "--fail-above", "aligned_error=0.001") == 1
    assert "rot180" in capsys.readouterr().out
    assert (tmp_path / "a" / "alignment.csv").is_file()  # the report is written before the gate
    assert cli("analyze", *common, "--out", str(tmp_path / "b"), "--fail-above", "aligned_error=5",
               "--fail-below", "aligned_cosine=-1") == 0
    assert cli("analyze", *common, "--out", str(tmp_path / "c"), "--fail-above", "aligned_error") == 2
    assert not (tmp_path / "c").exists()  # a malformed limit fails before the work


def test_a_limit_on_a_column_no_analysis_writes_fails_before_the_work(tmp_path, capsys, monkeypatch):
    import alignscope

    def must_not_run(*args, **kwargs):
        raise AssertionError("the analysis ran")

    monkeypatch.setattr(alignscope, "analyze", must_not_run)
    assert cli("analyze", "--out", str(tmp_path / "a"), "--fail-above", "aligned_eror=0.5") == 2
    err = capsys.readouterr().err
    assert "aligned_eror" in err and "did you mean aligned_error" in err and "Traceback" not in err
    assert cli("analyze", "--out", str(tmp_path / "b"), "--fail-below", "prediction_agreemnt=0.9") == 2
    assert "prediction_agreement" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_numeric_column_of_a_full_table_may_carry_a_limit():
    """With every fit and the output row, the table's numeric columns are all among those a limit may name."""
    import torch
    from torch import nn

    import alignscope
    from alignscope.columns import all_names, describe, limitable_columns

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    table = alignscope.analyze(net, transforms=["hflip", "rotate10"], images=torch.rand(8, 3, 32, 32), layers=["0", "2"],
                               input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4,
                               optimal=["family", "affine"], channel_map=["linear", "permutation"]).table
    numeric = {c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])}
    assert "optimal_affine_error" in numeric and "prediction_kl" in numeric and "registered_error" in numeric
    assert numeric <= limitable_columns(), numeric - limitable_columns()
    assert set(table.columns) <= all_names(), set(table.columns) - all_names()  # every column written is described
    assert all(describe(c) for c in table.columns)


def test_a_repeated_limit_keeps_the_strictest():
    from alignscope.report.gate import check

    table = pd.DataFrame({"layer": ["a", "b"], "transform": ["t", "t"], "aligned_error": [0.4, 0.7]})
    assert list(check(table, max=["aligned_error=0.5", "aligned_error=0.9"])["layer"]) == ["b"]
    assert list(check(table, max=["aligned_error=0.9", "aligned_error=0.5"])["layer"]) == ["b"]
    assert list(check(table, min=["aligned_error=0.5", "aligned_error=0.1"])["layer"]) == ["a"]
    with pytest.raises(UsageError):
        check(table, max=["aligned_error=inf"])


def test_a_fitted_map_worse_than_the_inverse_warp_held_out_is_a_warning():
    """A permutation that does not carry over to the held-out images must not pass as an alignment silently."""
    from alignscope.report.verdicts import report_warnings

    table = make_table(("rot90", "hflip"), layers=("stem", "deep")).assign(n_calibration=4)
    table["permuted_error"] = table["aligned_error"] - 0.05  # helps everywhere ...
    table.loc[(table["layer"] == "deep") & (table["transform"] == "rot90"), "permuted_error"] = 0.9  # ... but here
    lines = [line for line in report_warnings(table, {"images_used": ["x"] * 8}) if "channel permutation" in line]
    assert len(lines) == 1
    assert "4 calibration images" in lines[0] and "1 row(s)" in lines[0] and "deep / rot90 (0.90 > 0.12)" in lines[0]
    table["permuted_error"] = table["aligned_error"]  # no worse: no warning
    assert not [line for line in report_warnings(table, {}) if "channel permutation" in line]
