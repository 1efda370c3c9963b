"""AlignmentReport: the tidy table, verdicts, and atomic writing of a report folder.

A report folder holds ``alignment.csv`` (one row per model, layer and
transform), ``per_image.csv`` when asked for, ``run.json`` (settings,
versions, images, timings), ``fits.json`` when alignments were fitted (the
searched warps, channel permutations), PNG plots and ``report.html`` (all of
it on one self-contained page, see :mod:`alignscope.report.html`). A folder is written next to its
destination and renamed into place, so a reader never sees half a report;
an existing report is replaced only with ``force=True``, and only ever an
alignscope folder (see :mod:`alignscope.report.files`).
"""
from __future__ import annotations

import json
import math
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..columns import NUMERIC_COLUMNS, REQUIRED_COLUMNS, SUMMARY_COLUMNS  # noqa: F401  (re-exported)
from ..errors import ReportExistsError, UsageError
from .files import csv_text, restore_text_cells, validate_destination, publish_folder, write_text_atomic  # noqa: F401  (re-exported)
from .verdicts import report_warnings, verdicts


def format_table(table: pd.DataFrame, columns: tuple[str, ...] = SUMMARY_COLUMNS) -> str:
    """A compact fixed-width rendering of the summary columns."""
    shown = table[[c for c in columns if c in table.columns]].copy()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def write_csv(table: pd.DataFrame, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``table`` to ``path`` atomically; refuse to replace a file without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise ReportExistsError(f"{path} exists; pass --force (force=True) to overwrite it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, csv_text(table))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (Path,)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


@dataclass
class AlignmentReport:
    """Result of :func:`alignscope.analyze`.

    ``table``: one row per (model, layer, transform), columns described in
    docs/measures.md (:mod:`alignscope.columns`); ``per_image``: one row per image as well (when asked for);
    ``meta``: settings, versions, images and timings (what run.json holds).
    """

    table: pd.DataFrame
    per_image: pd.DataFrame | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)

    def permutation(self, layer: str, transform: str) -> list[int]:
        """The fitted channel permutation: a's channel i matches b''s channel ``[i]`` (needs channel_map='permutation')."""
        for key, fit in self.fits.items():
            if key.split("|")[:2] == [layer, transform] and "permutation" in fit:
                return list(fit["permutation"]["b_channel_for_a_channel"])
        raise KeyError(f"no permutation fitted for layer {layer!r} and transform {transform!r}; run analyze with channel_map='permutation'")

    def verdicts(self) -> list[str]:
        return verdicts(self.table)

    def warnings(self) -> list[str]:
        """Every caveat of this report, one sentence each (see :func:`report_warnings`)."""
        return report_warnings(self.table, self.meta)

    def check(self, max=None, min=None, layers=None, transforms=None) -> pd.DataFrame:  # noqa: A002
        """Rows that break ``max`` / ``min`` limits, e.g. ``report.check(max={"aligned_error": 0.5})`` (see :mod:`alignscope.report.gate`)."""
        from .gate import check

        return check(self.table, max=max, min=min, layers=layers, transforms=transforms)

    def to_csv(self, path: str | os.PathLike, force: bool = False) -> Path:
        return write_csv(self.table, path, force=force)

    def plot(self) -> dict[str, "matplotlib.figure.Figure"]:  # noqa: F821
        """Matplotlib figures keyed by file stem: depth plot, heatmap, one per sweep."""
        from .figures import report_figures

        return report_figures(self.table)

    def save(self, out: str | os.PathLike, force: bool = False, plots: bool = True, inputs: tuple = ()) -> Path:
        """Write the report folder ``out`` atomically (see module docstring and :mod:`alignscope.report.files`).

        ``inputs``: paths the run read (``--images``); ``out`` may not overlap them.
        """

        def write(folder: Path) -> None:
            (folder / "alignment.csv").write_text(csv_text(self.table), encoding="utf-8")
            if self.per_image is not None:
                (folder / "per_image.csv").write_text(csv_text(self.per_image), encoding="utf-8")
            meta = dict(self.meta, verdicts=self.verdicts(), warnings=self.warnings())
            (folder / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default), encoding="utf-8")
            if self.fits:
                (folder / "fits.json").write_text(json.dumps(self.fits, indent=1, default=_json_default), encoding="utf-8")
            figures: dict[str, bytes] = {}
            if plots:
                import matplotlib.pyplot as plt

                from .html import figure_png

                for stem, fig in self.plot().items():
                    figures[stem] = figure_png(fig)
                    plt.close(fig)
                    (folder / f"{stem}.png").write_bytes(figures[stem])
            from .html import write_report_page

            write_report_page(folder, self.table, self.meta, self.verdicts(), self.warnings(), figures)

        return publish_folder(Path(out), write, force, kind="report", inputs=inputs)

    def __repr__(self) -> str:
        from .output_rows import is_layer_row

        layers = self.table.loc[is_layer_row(self.table), "layer"].nunique()
        head = f"AlignmentReport(model={self.meta.get('model', '?')!r}, layers={layers}, " \
               f"transforms={self.table['transform'].nunique()}, images={int(self.table['n_images'].max()) if len(self.table) else 0})"
        from .output_rows import PREDICTION_SUMMARY, layer_rows, output_rows

        predictions = output_rows(self.table)
        shown = format_table(layer_rows(self.table)) + ("\n" + format_table(predictions, PREDICTION_SUMMARY) if len(predictions) else "")
        return head + "\n" + shown + "\n" + "\n".join(self.verdicts())

    def _repr_html_(self) -> str:
        """The summary of ``report.html`` (verdicts, warnings, table, settings, images) without the figures."""
        from .html import summary_html

        return summary_html(self.table, self.meta, self.verdicts(), self.warnings())


def _short_row(path: Path) -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first row with fewer fields than the header, else None.

    pandas fills a short row with NaN, which would read as "not measured";
    a written row always has every field, empty ones included.
    """
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        for line, row in enumerate(rows, start=2):
            if row and len(row) < len(header):
                return line, len(row), len(header)
    return None


def read_report_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ``alignment.csv``; a usage error if it lacks the contract's columns."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such CSV: {path}; pass the alignment.csv of a report")
    try:
        table = pd.read_csv(path, keep_default_na=True)
    except Exception as exc:
        raise UsageError(f"cannot read {path} as CSV: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(f"{path} is not an alignscope alignment.csv (missing columns: {', '.join(missing)})")
    short = _short_row(path)
    if short is not None:
        raise UsageError(f"{path}: row {short[0]} has {short[1]} of {short[2]} fields (a truncated or edited file); "
                         "pass an unedited alignment.csv or re-run the analysis")
    if table.empty:
        raise UsageError(f"{path} has a header but no rows; pass the alignment.csv of a finished report")
    for column in NUMERIC_COLUMNS:
        converted = pd.to_numeric(table[column], errors="coerce")
        broken = converted.isna() & table[column].notna()
        if broken.any():
            raise UsageError(f"{path}: column {column} holds non-numbers (row {int(broken.idxmax()) + 2}: "
                             f"{table[column][broken].iloc[0]!r}); pass an unedited alignment.csv")
        table[column] = converted
    if "sweep" in table.columns:
        table["sweep"] = table["sweep"].fillna("")
    return restore_text_cells(table)
