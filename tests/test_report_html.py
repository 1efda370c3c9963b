"""report.html: self-contained, complete, and rendered by a real (headless) browser where one is installed."""
import base64
import html
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from _tables import make_table
from PIL import Image

from alignscope.report.report import AlignmentReport

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _report(pretrained=True, skipped=True):
    table = pd.concat([make_table(("identity", "rot90", "scale1.25"), pretrained=pretrained),
                       make_table(("rotate0", "rotate45"), sweep="rotate:0:45:45", magnitudes=(0, 45), pretrained=pretrained)],
                      ignore_index=True)
    table.loc[(table["transform"] == "scale1.25") & (table["layer"] == "deep"), "floor_error"] = 0.9
    meta = {"alignscope_version": "0.1.0", "model": "net", "weights": "test <weights>", "pretrained": pretrained,
            "transforms": ["identity", "rot90", "scale1.25", "rotate:0:45:45"], "seed": 0, "mask": "auto",
            "images_used": ["/data/a.jpg", "/data/b.jpg"],
            "images_skipped": [{"path": "/data/broken.jpg", "reason": "cannot identify image file"}] if skipped else [],
            "layers_skipped": [], "versions": {"torch": "9.9", "python": "3.11"}, "machine": {"platform": "test"}}
    return AlignmentReport(table=table, meta=meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    report = _report(pretrained=False)
    out = report.save(tmp_path_factory.mktemp("html") / "report")
    return report, out, (out / "report.html").read_text(encoding="utf-8")


def test_page_is_self_contained_and_embeds_every_figure(saved):
    _, out, page = saved
    parser = _Tags()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in page.replace("http-equiv", "")
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(images) == len(pngs) == 3  # heatmap, depth, one sweep
    for src in images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in images}
    assert embedded == {(out / name).read_bytes() for name in pngs}  # the same figures as the PNG files


def test_page_holds_verdicts_warnings_table_settings_and_images(saved):
    report, _, page = saved
    text = html.unescape(page)
    for line in report.verdicts() + report.warnings():
        assert line in text
    warnings = " ".join(report.warnings())
    assert "RANDOM WEIGHTS" in warnings and "broken.jpg" in warnings and "scale1.25 at deep (0.90 > 0.33)" in warnings
    assert 'class="alert"' in page
    for column in report.table.columns:
        assert f">{column}</th>" in page
    assert text.count("<tr>") >= len(report.table)
    assert "test <weights>" in text and "&lt;weights&gt;" in page  # escaped, shown as written
    assert "versions.torch" in text and "/data/a.jpg" in text and "cannot identify image file" in text


def test_pretrained_report_has_no_random_banner_and_no_plots_page(tmp_path):
    report = _report(pretrained=True, skipped=False)
    out = report.save(tmp_path / "r", plots=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'class="alert"' not in page and "RANDOM" not in page
    assert "<img" not in page and "No figures were drawn" in page
    assert "No warnings." not in page  # the floor above aligned is still a warning
    assert report.warnings() == [w for w in report.warnings() if w.startswith("floor above")]


def test_notebook_repr_is_the_same_summary(saved):
    report, _, page = saved
    fragment = report._repr_html_()
    assert "<img" not in fragment and "<script" not in fragment
    body = page.split("<h2>Figures</h2>")[0]
    assert fragment.startswith(body.split("<body>\n", 1)[1].rstrip("\n"))
    assert fragment.split(">Table (", 1)[1] == page.split(">Table (", 1)[1].split("\n</body>")[0]


def _browser(*args, profile, timeout=120):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    return subprocess.run(flags + list(args), capture_output=True, text=True, timeout=timeout)


LOAD_PROBE = ('<script>window.addEventListener("load", () => { const imgs = [...document.images]; '
              'document.body.setAttribute("data-loaded", imgs.filter(i => i.complete && i.naturalWidth > 0).length '
              '+ "/" + imgs.length); });</script>')


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_a_headless_browser(saved, tmp_path):
    _, out, page = saved
    shot = tmp_path / "shot.png"
    _browser("--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri(),
             profile=tmp_path / "profile-shot")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2400, 1280)
    assert (pixels.min(axis=2) < 200).mean() > 0.05  # text and figures, not a blank page
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200

    # Which images the browser decoded: the page itself has no script, so a copy gets a probe that records it.
    def loaded(text, name):
        probe = tmp_path / name
        probe.write_text(text.replace("</body>", LOAD_PROBE + "</body>"), encoding="utf-8")
        dom = _browser("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / f"profile-{name}").stdout
        found = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
        assert found, dom[-500:]
        return int(found.group(1)), int(found.group(2))

    assert loaded(page, "probe.html") == (3, 3)
    broken = page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    assert loaded(broken, "control.html") == (2, 3)  # the probe does see an image that fails to load


def test_the_page_header_counts_layers_not_the_output_row():
    from alignscope.report.html import summary_html

    table = make_table(("rot90",), layers=("stem", "mid", "deep")).assign(kind="layer")
    output = table.iloc[:1].assign(kind="output", layer="output", aligned_error=np.nan, prediction_agreement=0.5)
    page = summary_html(pd.concat([table, output], ignore_index=True), {"model": "net"}, [], [])
    assert "3 layers" in page and "4 layers" not in page
