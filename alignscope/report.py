"""AlignmentReport: the tidy table, verdicts, and atomic writing of a report folder.

A report folder holds ``alignment.csv`` (one row per model, layer and
transform), ``per_image.csv`` when asked for, ``run.json`` (settings,
versions, images, timings), ``fits.json`` when alignments were fitted (the
searched warps, channel permutations) and PNG plots. A folder is written next to its
destination and renamed into place, so a reader never sees half a report;
an existing report is replaced only with ``force=True``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ReportExistsError, UsageError

REQUIRED_COLUMNS = (
    "model", "layer", "depth", "module", "channels", "height", "width", "stride", "transform", "exact",
    "n_images", "aligned_error", "aligned_error_std", "aligned_error_ci_low", "aligned_error_ci_high",
    "unaligned_error", "floor_error", "aligned_cosine",
)
SUMMARY_COLUMNS = ("layer", "stride", "transform", "aligned_error", "unaligned_error", "floor_error", "aligned_cosine", "n_images")
HALF_CHANCE = 0.5


def frame_comparison(group: pd.DataFrame) -> str:
    """Which frame aligns better over ``group``'s layers: the centred one (aligned_error) or the lattice (registered_error)."""
    if "registered_error" not in group:
        return ""
    both = group.dropna(subset=["registered_error", "aligned_error"])
    if both.empty:
        return ""
    diff = both["registered_error"] - both["aligned_error"]
    lower, higher = int((diff < 0).sum()), int((diff > 0).sum())
    if lower == higher == 0:
        return "; on the layers' lattices the same at every layer"
    frame = "the layers' lattices align" if diff.mean() < 0 else "the centred frame aligns"
    worst = both.loc[both["registered_error"].idxmax()]
    return (f"; {frame} better (registered - centred: mean {diff.mean():+.3f}, lower at {lower}/{len(both)} layers, "
            f"higher at {higher}; registered worst {worst['registered_error']:.3f} at {worst['layer']})")


def verdicts(table: pd.DataFrame) -> list[str]:
    """One sentence per (model, transform): where does g^-1 fail to bring the maps within half of chance?

    Each sentence ends with the comparison of the centred frame with the
    layers' measured lattices (:func:`frame_comparison`), where measured.
    """
    lines = []
    for (model, transform), group in table.groupby(["model", "transform"], sort=False):
        group = group.sort_values("depth")
        failing = group[group["aligned_error"] > HALF_CHANCE]
        worst = group.loc[group["aligned_error"].idxmax()] if group["aligned_error"].notna().any() else None
        prefix = f"{transform}" if table["model"].nunique() == 1 else f"{model} {transform}"
        if worst is None:
            lines.append(f"{prefix}: no valid cells to compare")
        elif failing.empty:
            lines.append(
                f"{prefix}: below half of chance at every layer after the inverse warp (worst "
                f"{worst['aligned_error']:.3f} at {worst['layer']}; floor up to {group['floor_error'].max():.3f})"
            )
        else:
            names = ", ".join(failing["layer"])
            lines.append(
                f"{prefix}: stays above half of chance after the inverse warp at {len(failing)}/{len(group)} layers "
                f"({names}); worst {worst['aligned_error']:.3f} at {worst['layer']} (floor there {worst['floor_error']:.3f})"
            )
        if worst is not None:
            lines[-1] += frame_comparison(group)
    return lines


def format_table(table: pd.DataFrame, columns: tuple[str, ...] = SUMMARY_COLUMNS) -> str:
    """A compact fixed-width rendering of the summary columns."""
    shown = table[[c for c in columns if c in table.columns]].copy()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(table: pd.DataFrame, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``table`` to ``path`` atomically; refuse to replace a file without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise ReportExistsError(f"{path} exists; pass --force (force=True) to overwrite it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic_text(path, table.to_csv(index=False))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (Path,)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def check_destination(out: str | os.PathLike, force: bool) -> Path:
    """Refuse a destination that is a file, or a non-empty folder without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise ReportExistsError(f"{out} already holds a report; pass --force to overwrite it or choose another --out")
    return out


def publish_folder(out: Path, write: "callable", force: bool) -> Path:
    """Build a folder with ``write(tmp_dir)`` beside ``out``, then move it into place.

    An existing non-empty ``out`` is replaced only with ``force``; the old
    folder is removed only after the new one is in place.
    """
    out = check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write(staging)
        if out.exists():
            retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, retired / "report")
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


@dataclass
class AlignmentReport:
    """Result of :func:`alignscope.analyze`.

    ``table``: one row per (model, layer, transform), columns described in the
    README; ``per_image``: one row per image as well (when asked for);
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

    def to_csv(self, path: str | os.PathLike, force: bool = False) -> Path:
        return write_csv(self.table, path, force=force)

    def plot(self) -> dict[str, "matplotlib.figure.Figure"]:  # noqa: F821
        """Matplotlib figures keyed by file stem: depth plot, heatmap, one per sweep."""
        from .plots import report_figures

        return report_figures(self.table)

    def save(self, out: str | os.PathLike, force: bool = False, plots: bool = True) -> Path:
        """Write the report folder ``out`` atomically (see module docstring)."""

        def write(folder: Path) -> None:
            self.table.to_csv(folder / "alignment.csv", index=False)
            if self.per_image is not None:
                self.per_image.to_csv(folder / "per_image.csv", index=False)
            meta = dict(self.meta, verdicts=self.verdicts())
            (folder / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default), encoding="utf-8")
            if self.fits:
                (folder / "fits.json").write_text(json.dumps(self.fits, indent=1, default=_json_default), encoding="utf-8")
            if plots:
                from .plots import save_figures

                save_figures(self.plot(), folder)

        return publish_folder(Path(out), write, force)

    def __repr__(self) -> str:
        head = f"AlignmentReport(model={self.meta.get('model', '?')!r}, layers={self.table['layer'].nunique()}, " \
               f"transforms={self.table['transform'].nunique()}, images={int(self.table['n_images'].max()) if len(self.table) else 0})"
        return head + "\n" + format_table(self.table) + "\n" + "\n".join(self.verdicts())

    def _repr_html_(self) -> str:
        return f"<p><b>AlignmentReport</b> {self.meta.get('model', '')}</p>" + self.table[list(SUMMARY_COLUMNS)].to_html(index=False, float_format=lambda v: f"{v:.3f}")


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
    if "sweep" in table.columns:
        table["sweep"] = table["sweep"].fillna("")
    return table
