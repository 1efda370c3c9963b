"""Reading the placement rows: the placement grid, one line per transform, the costliest modules, a caveat.

The placement rows (``kind`` = ``"placement"``, :mod:`alignscope.measure.placement`) say how much of
the prediction an exact STN at each place keeps. :class:`PlacementGrid` shows them as one screen:
rows are transforms (and, with fits, transform and alignment), columns are ``none`` (no STN: the
output row's f(g x)), ``input`` and the layers; cells are ``placed_agreement``. Only pandas here.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

from .grid import short_name
from .output_rows import output_rows, placement_rows

#: the grid's short label of each alignment (``placed_by``) after the transform
SHORT_BY = {"registered": "lattice", "optimal": "search", "optimal_affine": "affine", "channel_map": "chmap",
            "permutation": "perm"}

#: |KL| under the identity above which the write-back is not trusted (float32 forward passes give 0 here)
IDENTITY_KL_TOLERANCE = 1e-6


def _by(rows: pd.DataFrame) -> pd.Series:
    return rows["placed_by"].fillna("inverse").astype(str) if "placed_by" in rows else pd.Series("inverse", index=rows.index)


@dataclass
class PlacementGrid:
    """``placed_agreement`` per (transform, alignment) row and place column, with the no-STN agreement."""

    rows: list[tuple[str, str]]  # (transform, placed_by)
    places: list[str]
    cells: dict[tuple[str, str], dict[str, float]]
    none: dict[str, float]
    n_images: int

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> "PlacementGrid":
        placed = placement_rows(table)
        if placed.empty:
            return cls([], [], {}, {}, 0)
        placed = placed[placed["transform"] != "identity"]  # a sweep's values are rows like any transform
        by = _by(placed)
        keys = list(dict.fromkeys(zip(placed["transform"], by)))
        places = list(dict.fromkeys(placed.sort_values("depth", kind="stable")["layer"].astype(str)))
        cells: dict[tuple[str, str], dict[str, float]] = {key: {} for key in keys}
        for (transform, kind), (_, row) in zip(zip(placed["transform"], by), placed.iterrows()):
            cells[(transform, kind)][str(row["layer"])] = float(row["placed_agreement"])
        for (transform, kind), values in cells.items():  # a fitted STN shares the input placement
            if kind != "inverse" and "input" in cells.get((transform, "inverse"), {}):
                values.setdefault("input", cells[(transform, "inverse")]["input"])
        outputs = output_rows(table)
        none = {str(r["transform"]): float(r["prediction_agreement"]) for _, r in outputs.iterrows()
                if "prediction_agreement" in r}
        n = int(placed["n_images"].max()) if len(placed) else 0
        return cls(keys, places, cells, none, n)

    def _label(self, key: tuple[str, str]) -> str:
        return key[0] if key[1] == "inverse" else f"{key[0]} +{SHORT_BY.get(key[1], key[1])}"

    def text(self, width: int = 80) -> str:
        """Fixed-width lines; places that do not fit in ``width`` columns go to a further block."""
        if not self.rows:
            return "(placement rows only under the identity, the control: see alignment.csv, kind = placement)"
        first = max(9, *(len(self._label(key)) for key in self.rows)) + 1
        cell = 8
        per_block = max(1, (width - first - cell) // cell)
        blocks = [self.places[i:i + per_block] for i in range(0, len(self.places), per_block)]
        lines = [f"top-1 agreement with f(x) when an exact STN undoes g at each place (none: no STN); n = {self.n_images}"]
        kinds = sorted({key[1] for key in self.rows} - {"inverse"})
        if kinds:
            lines.append("; ".join(f"+{SHORT_BY.get(k, k)}: the STN applies {_BY_MEANING.get(k, k)}" for k in kinds))
        for number, block in enumerate(blocks):
            header = "transform".ljust(first) + ("none".rjust(cell) if number == 0 else "")
            lines.append(header + "".join(short_name(place, cell - 1).rjust(cell) for place in block))
            for key in self.rows:
                line = self._label(key).ljust(first)
                if number == 0:
                    none = self.none.get(key[0], math.nan)
                    line += (f"{none:.2f}" if math.isfinite(none) else "").rjust(cell)
                for place in block:
                    value = self.cells[key].get(place, math.nan)
                    line += (f"{value:.2f}" if math.isfinite(value) else "·").rjust(cell)
                lines.append(line)
        return "\n".join(lines)

    def html(self) -> str:
        """The same grid as an HTML table."""
        if not self.rows:
            return "<p>Placement rows only under the identity (the control); see alignment.csv.</p>"
        head = "<th title=\"no STN: f(g x) against f(x)\">none</th>" + "".join(
            f"<th title=\"{html.escape(place)}\">{html.escape(short_name(place, 10))}</th>" for place in self.places)
        body = []
        for key in self.rows:
            none = self.none.get(key[0], math.nan)
            tds = [f"<td>{none:.2f}</td>" if math.isfinite(none) else "<td></td>"]
            for place in self.places:
                value = self.cells[key].get(place, math.nan)
                tds.append(f"<td>{value:.2f}</td>" if math.isfinite(value) else "<td>·</td>")
            body.append(f"<tr><th>{html.escape(self._label(key))}</th>{''.join(tds)}</tr>")
        kinds = sorted({key[1] for key in self.rows} - {"inverse"})
        extra = "".join(f" <code>+{SHORT_BY.get(k, k)}</code>: the STN applies {html.escape(_BY_MEANING.get(k, k))}."
                        for k in kinds)
        legend = (f"<p class=\"sub\">top-1 agreement with f(x), n = {self.n_images}: an exact STN at each place (g x fed, "
                  "that place's output replaced by g⁻¹ of it; <code>input</code>: f(g⁻¹ g x)); <code>none</code>: no STN."
                  f"{extra} Intervals in the table below and in the figure.</p>")
        return f"<table class=\"grid\"><tr><th>transform</th>{head}</tr>{''.join(body)}</table>{legend}"


def placement_verdicts(table: pd.DataFrame, limit: int = 100) -> list[str]:
    """One line of at most ``limit`` characters per transform (g⁻¹ placements, identity omitted)."""
    if placement_rows(table).empty:
        return []
    grid = PlacementGrid.from_table(table)
    lines = []
    for key in grid.rows:
        if key[1] != "inverse":
            continue
        values = {place: v for place, v in grid.cells[key].items() if math.isfinite(v) and place != "input"}
        start = grid.cells[key].get("input", math.nan)
        if not values:
            line = f"{key[0]}: no placement could be measured (column why_missing)"
        else:
            low = min(values, key=values.get)
            high = max(values, key=values.get)
            at_layers = (f"{_pct(values[low])} at every layer" if values[low] == values[high] else
                         f"{_pct(values[low])[:-1]}–{_pct(values[high])} at layers (min {low}, max {high})")
            line = f"{key[0]}: exact STN keeps {_pct(start)} at input, {at_layers}"
            none = grid.none.get(key[0], math.nan)
            if math.isfinite(none):
                line += f"; none {_pct(none)}"
        lines.append(line if len(line) <= limit else line[: limit - 1] + "…")
    return lines


_BY_MEANING = {"registered": "g⁻¹ on the layer's lattice", "optimal": "the searched warp",
               "optimal_affine": "the searched affine warp", "channel_map": "g⁻¹ + fitted channel map",
               "permutation": "g⁻¹ + fitted channel permutation"}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%" if math.isfinite(value) else "?"


def costliest_modules(table: pd.DataFrame, count: int = 5) -> pd.DataFrame:
    """The places whose ``placement_drop`` is largest (g⁻¹ placements; identity left out), most costly first:
    the modules between the previous place and this one lose that share of the predictions."""
    placed = placement_rows(table)
    placed = placed[(placed["transform"] != "identity") & (_by(placed) == "inverse")]
    if "placement_drop" not in placed or placed["placement_drop"].isna().all():
        return placed.iloc[:0]
    columns = ["transform", "layer", "placement_drop", "placed_agreement", "placed_kl"]
    return placed.dropna(subset=["placement_drop"]).nlargest(count, "placement_drop")[columns]


def identity_caveat(table: pd.DataFrame) -> list[str]:
    """A warning for every place where the identity placement did not keep the prediction exactly: the map
    was not written back as the model produced it (or the model is not deterministic), so its rows are suspect."""
    placed = placement_rows(table)
    placed = placed[placed["transform"] == "identity"]
    if placed.empty:
        return []
    bad = placed[(placed["placed_agreement"] < 1) | (placed["placed_kl"].abs() > IDENTITY_KL_TOLERANCE)]
    return [f"placement at {row['layer']}: under the identity the prediction changed (agreement "
            f"{row['placed_agreement']:.3f}, KL {row['placed_kl']:.2g} nats); the model is not deterministic there or its "
            "output was not written back as read, so that place's placement rows are not to be trusted"
            for _, row in bad.iterrows()]
