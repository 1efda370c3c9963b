"""Trust: the CLI starts anywhere, user folders are never deleted, bad input fails fast, no silent numbers."""
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import alignscope
from alignscope.cli.main import main
from alignscope.errors import AlignscopeError, ImageError, ModelError, ReportExistsError, TransformSpecError, UsageError
from alignscope.geometry.transforms import as_transforms, parse_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCRIPT = Path(sys.executable).parent / "alignscope"


def cli(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU())


def run(net, images, **kw):
    kw.setdefault("batch_size", 4)
    return alignscope.analyze(net.eval(), images=images, input_size=(3, 64, 64), mean=MEAN, std=STD, **kw)


# --- 1. the CLI starts from any folder ------------------------------------------------------------

@pytest.mark.skipif(not SCRIPT.exists(), reason="no installed alignscope console script")
def test_console_script_ignores_a_source_folder_in_the_working_directory(tmp_path):
    # a folder called alignscope/ (like a clone's root) must not shadow the installed package
    (tmp_path / "alignscope").mkdir()
    (tmp_path / "alignscope" / "__init__.py").write_text("")
    result = subprocess.run([str(SCRIPT), "analyze", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Usage: alignscope analyze" in result.stdout


def test_malloc_is_tuned_in_process_and_the_opt_out_works():
    code = "from alignscope.runtime.allocator import tune_malloc; import json; print(json.dumps(tune_malloc()))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    skipped = json.loads(subprocess.run([sys.executable, "-c", code], env=dict(env, ALIGNSCOPE_NO_MALLOC_TUNING="1"),
                                        capture_output=True, text=True, check=True).stdout)
    assert not skipped["tuned"] and "ALIGNSCOPE_NO_MALLOC_TUNING" in skipped["reason"]
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tuned["tuned"] and set(tuned["settings"]) == {"M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "M_TOP_PAD"}


def test_the_command_line_bounds_onednns_cache_unless_the_user_chose():
    code = ("import os, json; from alignscope.runtime.allocator import bound_onednn_cache, malloc_tuning; "
            "bound_onednn_cache(); print(json.dumps([os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), malloc_tuning()]))")
    env = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE" not in k and k != "ALIGNSCOPE_NO_MALLOC_TUNING"}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    value, state = run()
    assert value == "128" and state["onednn_primitive_cache_capacity"] == 128
    assert run(DNNL_PRIMITIVE_CACHE_CAPACITY="7") == [None, {}]  # the legacy name counts as the user's choice
    assert run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="9")[0] == "9"
    assert run(ALIGNSCOPE_NO_MALLOC_TUNING="1") == [None, {}]


# --- 2. folders alignscope did not write are never replaced ---------------------------------------

def user_folder(tmp_path):
    folder = tmp_path / "myphotos"
    folder.mkdir()
    Image.new("RGB", (80, 80), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (80, 80), (30, 200, 30)).save(folder / "b.png")
    (folder / "notes.txt").write_text("mine")
    return folder


def test_force_never_deletes_a_folder_that_is_not_a_report(tmp_path):
    folder = user_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    for args in (["--out", str(folder)], ["--out", str(folder), "--force"]):
        assert cli("analyze", *args, "--quiet") == 2
    assert cli("analyze", "--images", str(folder), "--out", str(folder), "--force", "--quiet") == 2
    assert cli("analyze", "--images", str(folder), "--out", str(folder / "inside"), "--quiet") == 2
    assert cli("analyze", "--images", str(folder / "a.png"), "--out", str(folder), "--force", "--quiet") == 2
    assert cli("explain", "--layer", "blocks.0", "--out", str(folder), "--force") == 2
    assert cli("stn", "--quick", "--out", str(folder), "--force") == 2
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "notes.txt").read_text() == "mine"


def test_force_keeps_files_a_user_added_to_a_report_folder(tmp_path):
    from alignscope.report.files import publish_folder

    out = publish_folder(tmp_path / "r", lambda d: (d / "alignment.csv").write_text("1"), force=False)
    (out / "mynotes.txt").write_text("mine")
    with pytest.raises(ReportExistsError, match="mynotes.txt"):
        publish_folder(out, lambda d: None, force=True)
    assert (out / "mynotes.txt").read_text() == "mine"
    (out / "mynotes.txt").unlink()
    publish_folder(out, lambda d: (d / "alignment.csv").write_text("2"), force=True)
    assert (out / "alignment.csv").read_text() == "2"


def test_force_replaces_an_alignscope_folder_and_modes_follow_the_umask(tmp_path):
    from alignscope.report.files import MARKER, publish_folder

    old = os.umask(0o022)
    try:
        out = publish_folder(tmp_path / "r", lambda d: (d / "x.csv").write_text("1"), force=False)
        assert (out / MARKER).is_file()
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert stat.S_IMODE((out / MARKER).stat().st_mode) == 0o644
        with pytest.raises(ReportExistsError):
            publish_folder(out, lambda d: None, force=False)
        publish_folder(out, lambda d: (d / "y.csv").write_text("2"), force=True)
        assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "y.csv"])
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or retired folders left


def test_plot_and_compare_refuse_user_folders_and_their_inputs(tmp_path):
    report = tmp_path / "report"
    table = fake_table()
    report.mkdir()
    table.to_csv(report / "alignment.csv", index=False)
    folder = user_folder(tmp_path)
    assert cli("plot", str(report / "alignment.csv"), "--out", str(folder), "--force") == 2
    other = tmp_path / "other"
    other.mkdir()
    table.to_csv(other / "alignment.csv", index=False)
    both = [str(report / "alignment.csv"), str(other / "alignment.csv")]
    assert cli("compare", *both, "--out", str(folder), "--force") == 2
    assert cli("compare", *both, "--out", str(report), "--force") == 2  # holds the input
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png", "notes.txt"]
    assert cli("plot", str(report / "alignment.csv"), "--out", str(tmp_path / "plots")) == 0
    assert cli("plot", str(report / "alignment.csv"), "--out", str(tmp_path / "plots"), "--force") == 0


def test_an_interrupted_plot_leaves_the_old_png_whole(tmp_path, monkeypatch):
    import matplotlib.figure

    from alignscope.report.figures import report_figures
    from alignscope.report.plots import save_figures

    figures = report_figures(fake_table())
    save_figures(dict(figures), tmp_path)
    png = tmp_path / "alignment_by_depth.png"
    original = png.read_bytes()

    def broken(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        save_figures(report_figures(fake_table()), tmp_path)
    assert png.read_bytes() == original
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_while_writing_removes_the_staging_folder(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from alignscope.cli.main import Terminated, _terminate
        from alignscope.report.files import publish_folder
        signal.signal(signal.SIGTERM, _terminate)
        def write(folder):
            (folder / "part.csv").write_text("1")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        try:
            publish_folder(Path({str(tmp_path / 'out')!r}), write, force=False)
        except Terminated:
            raise SystemExit(143)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr
    assert list(tmp_path.iterdir()) == []


def fake_table():
    rows = []
    for depth, layer in enumerate(["l1", "l2"], start=1):
        for transform in ["identity", "rot90", "rotate30"]:
            rows.append({"model": "m", "layer": layer, "depth": depth, "module": "Conv2d", "channels": 4, "height": 8,
                         "width": 8, "stride": 2.0 * depth, "transform": transform, "exact": transform != "rotate30",
                         "n_images": 4, "aligned_error": 0.1 * depth, "aligned_error_std": 0.01,
                         "aligned_error_ci_low": 0.05, "aligned_error_ci_high": 0.15, "unaligned_error": 0.5,
                         "floor_error": 0.0, "aligned_cosine": 0.9, "chance_distance": 1.0, "sweep": "",
                         "magnitude": float("nan"), "pretrained": True})
    return pd.DataFrame(rows)


# --- 3. numbers that could be silently wrong -------------------------------------------------------

@pytest.mark.parametrize("value", [10.0, 10.0000001, 1e-05, 2.5e-07, 0.1, -0.3, 1 / 3, 3000000.0, 123456789.123, 1e-300 * 1e290])
def test_canonical_specs_parse_back_bit_for_bit(value):
    for family in ("rotate", "scale", "shear"):
        if family == "scale" and not 1e-6 <= value <= 1e6 or family == "shear" and abs(value) >= 90 or abs(value) > 1e6:
            continue
        first = parse_transform(f"{family}{value!r}")[0]
        again = parse_transform(first.spec)[0]
        assert again.spec == first.spec and again.parts == first.parts
        assert first.parts[0].values[0] == value  # exactly the number given
    t = parse_transform(f"translate{int(value)},-{int(value)}")[0]
    assert parse_transform(t.spec)[0].parts == t.parts


def test_nearby_transforms_are_not_pooled_and_duplicates_are_measured_once(photo_tensor, caplog):
    assert [t.spec for t in as_transforms(["rotate10", "rotate10.0000001"])] == ["rotate10", "rotate10.0000001"]
    assert [t.spec for t in as_transforms(["rot90", "rot90", "rotate10"])] == ["rot90", "rotate10"]
    assert any("more than once" in r.message for r in caplog.records)
    table = run(small_net(), photo_tensor[:4], transforms=["rot90", "rot90"]).table
    assert len(table) == table["layer"].nunique() and set(table["n_images"]) == {4}  # one row per layer, 4 images, not 8


def test_sweeps_with_tiny_or_huge_steps_read_back_what_they_write():
    scales = parse_transform("scale:0.00001:0.00003:0.00001")
    assert [t.spec for t in scales] == ["scale1e-05", "scale2e-05", "scale3e-05"]
    shifts = parse_transform("translate:0:3000000:1000000")
    assert [t.spec for t in shifts][-1] == "translate3000000,0"
    for t in scales + shifts:
        assert parse_transform(t.spec)[0].parts == t.parts


@pytest.mark.parametrize("spec", ["rotate:nan:90:15", "rotate:0:inf:15", "rotate" + "9" * 400, "scale1e-320",
                                  "scale1e308", "scale1e-300", "rotate1e300", "shear1e7",
                                  "translate1e300,0", "rotatenan", "scale-1"])
def test_bad_numbers_in_specs_are_usage_errors(spec):
    with pytest.raises(TransformSpecError) as info:
        parse_transform(spec)
    assert len(str(info.value)) < 400


def test_batch_size_and_path_order_never_change_a_number(tmp_path):
    net = small_net()
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # an unreadable image inside the order
    tables = {}
    for batch in (1, 2, 3, 16):
        report = run(net, str(folder), batch_size=batch, transforms=["rot90", "rotate30", "translate5,0"], seed=4)
        tables[batch] = report.table
    columns = ["aligned_error", "unaligned_error", "floor_error", "chance_distance", "aligned_error_ci_low", "aligned_error_ci_high"]
    for batch in (1, 2, 3):
        np.testing.assert_allclose(tables[batch][columns].to_numpy(), tables[16][columns].to_numpy(), rtol=1e-6)
        assert (tables[batch]["n_images"] == 7).all()


def test_batch_size_never_changes_a_number_for_tensors(photo_tensor):
    net = small_net()
    tables = [run(net, photo_tensor, batch_size=b, transforms=["hflip", "rotate15"]).table for b in (2, 3, 16)]
    for table in tables[:2]:
        np.testing.assert_allclose(table["chance_distance"], tables[2]["chance_distance"], rtol=1e-6)
        np.testing.assert_allclose(table["aligned_error_ci_high"], tables[2]["aligned_error_ci_high"], rtol=1e-6)


def test_non_finite_weights_and_inputs_are_refused(photo_tensor):
    net = small_net()
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN or inf"):
        run(net, photo_tensor[:4], transforms=["rot90"])
    bad = photo_tensor[:4].clone()
    bad[2, 0, 5, 5] = float("nan")
    with pytest.raises(ImageError, match="NaN or inf in 1 of 4 images"):
        run(small_net(), bad, transforms=["rot90"])
    with pytest.raises(ImageError, match="dtype torch.uint8"):
        run(small_net(), (photo_tensor[:4] * 50).to(torch.uint8), transforms=["rot90"])


class Overflow(nn.Module):
    """Multiplies by 1e30 (float32 overflows to inf) for images whose mean is above ``threshold``."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        big = (x.mean(dim=(1, 2, 3), keepdim=True) > self.threshold).float()
        return x * (1 + big * 1e30) * 1e10


def test_overflowing_layers_are_reported_not_silently_dropped(photo_tensor, caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Overflow(threshold=-1e9), nn.Conv2d(4, 4, 3, padding=1))
    net2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    report = run(net2, photo_tensor[:4], transforms=["rot90"])
    assert (report.table["n_nonfinite"] == 0).all()
    with pytest.raises(AlignscopeError, match="every feature map was NaN or inf"):
        run(net, photo_tensor[:4], transforms=["rot90"], layers=["1", "2"])
    mixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Overflow(threshold=-1e9))
    table = run(mixed, photo_tensor[:4], transforms=["rot90"], layers=["0", "2"]).table
    assert table.set_index("layer").loc["2", "n_nonfinite"] == 4
    assert table.set_index("layer").loc["0", "n_nonfinite"] == 0
    messages = [r.message for r in caplog.records]
    assert any("non-finite feature maps" in m and "2 (4 of 4 images)" in m for m in messages)
    assert not any("zero chance distance" in m for m in messages)


@pytest.mark.parametrize("ridge", ["inf", "nan", "-1"])
def test_ridge_must_be_finite(ridge):
    assert cli("analyze", "--channel-map", "linear", "--ridge", ridge, "--quiet") == 2
    with pytest.raises(UsageError):
        alignscope.analyze(small_net(), input_size=(3, 64, 64), channel_map="linear", ridge=float(ridge))


# --- 4. bad input fails fast, with exit 2 and one line ---------------------------------------------

def no_model_loading(monkeypatch):
    import alignscope.engine.context
    import alignscope.model.options

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(alignscope.model.options, "load_model", fail)
    monkeypatch.setattr(alignscope.engine.context, "probe_layers", fail)


@pytest.mark.parametrize("args", [
    ["--transform", "rotat30"], ["--transform", "rotate:nan:90:15"], ["--transform", "rotate:0:inf:15"],
    ["--transform", "rotate" + "1" * 400], ["--seed", str(2**70)], ["--device", "garbage"],
    ["--calibration-images", "4"], ["--out", "/proc/alignscope-x"],
])
def test_bad_input_is_refused_before_the_model_loads(args, monkeypatch, tmp_path, capsys):
    no_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli("analyze", *args, "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)


def test_out_below_a_file_is_refused_before_the_work(monkeypatch, tmp_path):
    no_model_loading(monkeypatch)
    (tmp_path / "afile").write_text("x")
    assert cli("analyze", "--out", str(tmp_path / "afile" / "sub"), "--quiet") == 2


@pytest.mark.parametrize("content", ["", "model,layer\n", None])
def test_plot_and_compare_refuse_broken_csvs(tmp_path, content):
    path = tmp_path / "alignment.csv"
    if content is None:
        table = fake_table()
        table["aligned_error"] = table["aligned_error"].astype(object)
        table.loc[1, "aligned_error"] = "oops"
        table.to_csv(path, index=False)
    else:
        header = ",".join(fake_table().columns) + "\n" if content == "" else content
        path.write_text(header)
    good = tmp_path / "good" / "alignment.csv"
    good.parent.mkdir()
    fake_table().to_csv(good, index=False)
    assert cli("plot", str(path), "--out", str(tmp_path / "p")) == 2
    assert cli("compare", str(good), str(path), "--out", str(tmp_path / "c")) == 2
    assert not (tmp_path / "c").exists()


def test_truncated_csv_row_is_refused_not_read_as_missing(tmp_path):
    path = tmp_path / "alignment.csv"
    fake_table().to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:4])  # a row cut short, as by an interrupted copy
    path.write_text("\n".join(lines) + "\n")
    assert cli("plot", str(path), "--out", str(tmp_path / "p")) == 2
    assert not (tmp_path / "p").exists()


def test_compare_needs_two_distinct_reports(tmp_path):
    path = tmp_path / "r" / "alignment.csv"
    path.parent.mkdir()
    fake_table().to_csv(path, index=False)
    assert cli("compare", str(path), "--out", str(tmp_path / "c1")) == 2
    assert cli("compare", str(path), str(tmp_path / "r" / ".." / "r" / "alignment.csv"), "--out", str(tmp_path / "c2")) == 2
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_text_file_as_weights_is_not_called_a_pickle(tmp_path):
    from alignscope.errors import ModelError
    from alignscope.model.build import load_checkpoint

    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(ModelError, match="not a torch checkpoint"):
        load_checkpoint(path)


def test_repeated_images_options_use_the_union(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, colour in ((a, 50), (b, 150)):
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (70, 70), (colour + 40 * i, 20, 90)).save(folder / f"{i}.png")
    from alignscope.inputs.images import discover_images

    assert len(discover_images([str(a), str(b)])) == 4
    out = tmp_path / "r"
    assert cli("analyze", "--images", str(a), "--images", str(b), "--transform", "hflip", "--layers", "blocks.0",
               "--out", str(out), "--no-plots", "--quiet") == 0
    assert len(json.loads((out / "run.json").read_text())["images_used"]) == 4


def test_a_decompression_bomb_is_skipped_and_listed(tmp_path, monkeypatch):
    from alignscope.inputs.images import image_stream
    from alignscope.model.build import DataConfig

    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 10, 10)).save(tmp_path / f"ok{i}.png")
    Image.new("RGB", (200, 200)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200 x 200 = 40000 pixels > 2 x 5000: PIL's bomb error
    stream = image_stream(str(tmp_path), DataConfig(input_size=(3, 32, 32), crop_pct=1.0), batch_size=2)
    batches = list(stream)
    assert sum(b.pixels.shape[0] for b in batches) == 3
    assert [Path(p).name for p, _ in stream.skipped] == ["bomb.png"]
    assert "too large" in stream.skipped[0][1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not SCRIPT.exists(), reason="no installed alignscope console script")
def test_a_stray_world_size_fails_clearly(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    args = [str(SCRIPT), "analyze", "--max-images", "2", "--transform", "rot90", "--out", str(tmp_path / "r")]
    alone = subprocess.run(args, env=dict(base, WORLD_SIZE="2"), capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "MASTER_ADDR" in alone.stderr and "Traceback" not in alone.stderr
    env = dict(base, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               ALIGNSCOPE_DIST_TIMEOUT="3")
    waiting = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert waiting.returncode == 1, waiting.stderr
    assert "waiting up to 3 s" in waiting.stderr and "could not form the process group" in waiting.stderr
    assert "Traceback" not in waiting.stderr


@pytest.mark.skipif(not SCRIPT.exists(), reason="no installed alignscope console script")
def test_library_warnings_become_one_actionable_line(tmp_path):
    too_many = (os.cpu_count() or 1) + 2
    result = subprocess.run(
        [str(SCRIPT), "analyze", "--workers", str(too_many), "--max-images", "3", "--transform", "hflip", "--layers",
         "blocks.0", "--out", str(tmp_path / "r"), "--no-plots", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"--workers {too_many} is more than" in result.stderr
    assert "Warning:" not in result.stderr and "warnings.warn" not in result.stderr
