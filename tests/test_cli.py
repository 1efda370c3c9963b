import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from alignscope.cli.main import main
from alignscope.report.report import REQUIRED_COLUMNS


def cli(*args):
    """Run the CLI in-process; returns the exit code."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def cli_subprocess(*args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alignscope", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "report"
    assert cli("analyze", "--transform", "rot90", "--transform", "rotate:0:30:15", "--max-images", "4",
               "--batch-size", "4", "--per-image", "--out", str(out), "--quiet") == 0
    return out


def test_analyze_writes_report_files_and_columns(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"alignment.csv", "per_image.csv", "run.json", "alignment_by_depth.png", "alignment_heatmap.png",
            "sweep_rotate_0_30_15.png"} <= names
    table = pd.read_csv(report_dir / "alignment.csv")
    assert list(table.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert len(table) == 5 * 4 + 4  # 5 stages x (rot90 + 3 sweep steps), and the output row of each transform
    assert list(table["kind"]).count("output") == 4
    run = json.loads((report_dir / "run.json").read_text())
    assert run["model"] == "tf_efficientnet_lite0" and run["pretrained"] is True
    assert len(run["images_used"]) == 4 and run["images_skipped"] == []
    assert run["versions"]["torch"] and run["verdicts"]
    per_image = pd.read_csv(report_dir / "per_image.csv")
    assert len(per_image) == 4 * len(table)


def test_existing_report_is_not_overwritten_without_force(report_dir):
    before = (report_dir / "alignment.csv").read_bytes()
    assert cli("analyze", "--transform", "hflip", "--max-images", "2", "--out", str(report_dir), "--quiet") == 2
    assert (report_dir / "alignment.csv").read_bytes() == before


def test_force_replaces_report(tmp_path):
    out = tmp_path / "r"
    assert cli("analyze", "--transform", "hflip", "--max-images", "2", "--layers", "blocks.6", "--out", str(out), "--no-plots", "-q") == 0
    assert cli("analyze", "--transform", "vflip", "--max-images", "2", "--layers", "blocks.6", "--out", str(out), "--no-plots", "-q", "--force") == 0
    assert pd.read_csv(out / "alignment.csv")["transform"].unique().tolist() == ["vflip"]  # layer and output row
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folders left


def test_json_output(tmp_path, capsys):
    assert cli("analyze", "--transform", "rot180", "--max-images", "2", "--layers", "blocks.4", "--out", str(tmp_path / "j"), "--no-plots", "--json") == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["transform"] == "rot180" and records[0]["layer"] == "blocks.4"


@pytest.mark.parametrize("args, needle", [
    (["--transform", "spin30"], "bad transform 'spin30'"),
    (["--model", "resnet5"], "closest timm names"),
    (["--layers", "blocks.9"], "unknown layer 'blocks.9'"),
    (["--images", "no/such/dir"], "no such image file"),
])
def test_bad_input_is_one_line_with_exit_2(tmp_path, args, needle):
    proc = cli_subprocess("analyze", *args, "--out", str(tmp_path / "x"), tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_debug_shows_traceback(tmp_path):
    proc = cli_subprocess("analyze", "--transform", "spin30", "--debug", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_plot_and_compare_from_csv(report_dir, tmp_path, capsys):
    assert cli("plot", str(report_dir / "alignment.csv"), "--out", str(tmp_path / "plots")) == 0
    assert (tmp_path / "plots" / "alignment_by_depth.png").stat().st_size > 10_000
    assert cli("plot", str(report_dir / "alignment.csv"), "--out", str(tmp_path / "plots")) == 2  # no --force
    csv = str(report_dir / "alignment.csv")
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    shutil.copy(csv, rerun / "alignment.csv")  # a second run of the same model: its folder tells it apart
    assert cli("compare", csv, str(rerun / "alignment.csv"), "--out", str(tmp_path / "cmp")) == 0
    assert (tmp_path / "cmp" / "comparison_by_depth.png").exists()
    assert pd.read_csv(tmp_path / "cmp" / "comparison.csv")["model"].nunique() == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli("plot", str(bad)) == 2


def test_layers_and_models_commands(capsys):
    assert cli("layers", "tf_efficientnet_lite0", "--format", "csv") == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert table[table["default"]]["name"].tolist() == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    # measured lattices of the stages ("SAME" padding: cell j at s j + s - 1); other modules only with --lattice-all
    stages = table[table["default"]]
    assert stages["offset_x"].tolist() == stages["offset_y"].tolist() == [1, 3, 7, 15, 31]
    assert table[~table["default"]]["offset_x"].isna().all()
    assert cli("models") == 0
    assert "tf_efficientnet_lite0" in capsys.readouterr().out
    assert cli("--version") == 0


def test_layers_refuses_two_models_and_a_size_with_no_output(capsys):
    assert cli("layers", "resnet18", "--model", "resnet50", "--no-pretrained") == 2
    assert "two models given" in capsys.readouterr().err
    assert cli("layers", "resnet18", "--no-pretrained", "--input-size", "1,1") == 2
    assert "larger --input-size" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (("analyze", "--foo"), "No such option '--foo'"),
    (("analyze", "--max-images", "x"), "'--max-images'"),
    (("nosuch",), "No such command 'nosuch'"),
])
def test_command_line_parse_errors_are_one_line_with_exit_code_2(args, needle, capsys):
    assert cli(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "--help" in lines[0], captured.err
    assert "Usage:" not in captured.err + captured.out
