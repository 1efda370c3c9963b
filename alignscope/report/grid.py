"""The summary grid: one screen that answers the audit, in the terminal and at the top of report.html.

Rows are transforms, columns are the selected layers (short names), each cell is
``aligned_error`` (1 = as far apart as two unrelated images) with a mark read from its 95%
interval, and the last column is the output row's top-1 agreement. The marks:

- ``✓`` aligned: the interval's upper end is below :data:`ALIGNED_BELOW` (a third of chance).
  An exact integer shift of the default model's maps (``translate32,0`` on tf_efficientnet_lite0)
  reads 0.12 - 0.27, all of it borders and padding; a third of chance leaves room for that and
  for resampling (the floor of ``rotate15``: 0.18 - 0.24).
- ``✗`` not aligned: the interval's lower end is above :data:`NOT_ALIGNED_ABOVE` (half of chance):
  after g⁻¹ the maps are nearer an unrelated image's than their own image's (the midpoint
  between 0, the same image, and 1, another image).
- ``~`` partly: neither (between the two, or an interval too wide to tell).
- ``·`` no number (``why_missing`` says why).

Only pandas here (no torch), like the rest of :mod:`alignscope.report`.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

from .output_rows import is_layer_row, is_output_row

ALIGNED_BELOW = 1 / 3
NOT_ALIGNED_ABOVE = 0.5
MARKS = {"aligned": "✓", "partly": "~", "not aligned": "✗", "missing": "·"}


def cell_class(row: pd.Series) -> str:
    """``aligned`` | ``partly`` | ``not aligned`` | ``missing`` for one layer row, from its 95% interval."""
    value = row.get("aligned_error", math.nan)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "missing"
    low, high = row.get("aligned_error_ci_low", math.nan), row.get("aligned_error_ci_high", math.nan)
    high = value if not math.isfinite(high) else high  # one image: no interval, read the value itself
    low = value if not math.isfinite(low) else low
    if high < ALIGNED_BELOW:
        return "aligned"
    if low > NOT_ALIGNED_ABOVE:
        return "not aligned"
    return "partly"


def short_name(name: str, width: int = 8) -> str:
    """A column label of at most ``width`` characters: the name, or its parts but the last cut to their
    first letter (``blocks.10`` -> ``b.10``), or its last parts."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    initials = ".".join([p[:1] for p in parts[:-1]] + parts[-1:])
    if len(initials) <= width:
        return initials
    for start in range(1, len(parts)):
        tail = ".".join(parts[start:])
        if len(tail) <= width:
            return tail
    return name[: width - 1] + "…"


@dataclass
class SummaryGrid:
    """The grid's content: ``cells[transform][layer] = (value, class)``, ``agreement[transform]``."""

    model: str
    transforms: list[str]
    layers: list[str]
    cells: dict[str, dict[str, tuple[float, str]]]
    agreement: dict[str, tuple[float, float, float]]  # value, 95% low, high
    n_images: int

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> "SummaryGrid":
        output = is_output_row(table)
        layers_rows = table[is_layer_row(table) & (table["transform"] != "identity")]
        layers_rows = layers_rows[layers_rows["sweep"].fillna("").astype(str) == ""] if "sweep" in layers_rows else layers_rows
        order = layers_rows.sort_values("depth") if "depth" in layers_rows else layers_rows
        layers = list(dict.fromkeys(order["layer"]))
        transforms = list(dict.fromkeys(layers_rows["transform"]))
        cells: dict[str, dict[str, tuple[float, str]]] = {t: {} for t in transforms}
        for _, row in layers_rows.iterrows():
            cells[row["transform"]][row["layer"]] = (float(row["aligned_error"]), cell_class(row))
        agreement = {}
        for _, row in table[output].iterrows():
            if row["transform"] in cells and "prediction_agreement" in row:
                agreement[row["transform"]] = (float(row["prediction_agreement"]),
                                               float(row.get("prediction_agreement_ci_low", math.nan)),
                                               float(row.get("prediction_agreement_ci_high", math.nan)))
        n = int(layers_rows["n_images"].max()) if len(layers_rows) else 0
        model = str(table["model"].iloc[0]) if len(table) else "?"
        return cls(model, transforms, layers, cells, agreement, n)

    def text(self, width: int = 80) -> str:
        """Fixed-width lines; layers that do not fit in ``width`` columns go to a second block."""
        if not self.transforms:
            return "(no layer rows to summarise)"
        first = max(9, *(len(t) for t in self.transforms)) + 1
        cell = 9
        tail = 7 if self.agreement else 0
        per_block = max(1, (width - first - tail) // cell)
        blocks = [self.layers[i:i + per_block] for i in range(0, len(self.layers), per_block)] or [[]]
        lines = [f"aligned_error (1 = chance): {MARKS['aligned']} 95% CI < {ALIGNED_BELOW:.2f}, {MARKS['not aligned']} "
                 f"> {NOT_ALIGNED_ABOVE:.2f}, {MARKS['partly']} between; n = {self.n_images}"]
        for number, block in enumerate(blocks):
            last = number == len(blocks) - 1
            header = "transform".ljust(first) + "".join(short_name(layer, cell - 1).rjust(cell) for layer in block)
            if last and self.agreement:
                header += "agree".rjust(tail)
            lines.append(header)
            for transform in self.transforms:
                line = transform.ljust(first)
                for layer in block:
                    value, kind = self.cells[transform].get(layer, (math.nan, "missing"))
                    shown = "  ·" if kind == "missing" else f"{value:.2f}{MARKS[kind]}"
                    line += shown.rjust(cell)
                if last and self.agreement:
                    agree = self.agreement.get(transform)
                    line += ("" if agree is None else f"{agree[0]:.2f}").rjust(tail)
                lines.append(line)
        return "\n".join(lines)

    def html(self) -> str:
        """The same grid as an HTML table (cells coloured by class, the interval in a tooltip)."""
        if not self.transforms:
            return "<p>No layer rows to summarise.</p>"
        head = "".join(f"<th title=\"{html.escape(layer)}\">{html.escape(short_name(layer, 10))}</th>" for layer in self.layers)
        if self.agreement:
            head += "<th title=\"top-1 agreement of f(x) and f(g x), 95% Wilson interval\">output agreement</th>"
        rows = []
        for transform in self.transforms:
            tds = []
            for layer in self.layers:
                value, kind = self.cells[transform].get(layer, (math.nan, "missing"))
                text = "·" if kind == "missing" else f"{value:.2f} {MARKS[kind]}"
                tds.append(f"<td class=\"grid-{kind.replace(' ', '-')}\" title=\"{html.escape(kind)}\">{text}</td>")
            if self.agreement:
                agree = self.agreement.get(transform)
                tds.append("<td></td>" if agree is None else
                           f"<td title=\"95% {agree[1]:.2f} – {agree[2]:.2f}\">{agree[0]:.2f}</td>")
            rows.append(f"<tr><th>{html.escape(transform)}</th>{''.join(tds)}</tr>")
        legend = (f"<p class=\"sub\">aligned_error (1 = as far apart as two unrelated images), n = {self.n_images}; "
                  f"{MARKS['aligned']} aligned: 95% interval below {ALIGNED_BELOW:.2f}; {MARKS['not aligned']} not: above "
                  f"{NOT_ALIGNED_ABOVE:.2f}; {MARKS['partly']} between; · no number (why_missing).</p>")
        return f"<table class=\"grid\"><tr><th>transform</th>{head}</tr>{''.join(rows)}</table>{legend}"


def short_verdicts(table: pd.DataFrame, limit: int = 100) -> list[str]:
    """One line of at most ``limit`` characters per transform (identity omitted); the details are in report.html."""
    grid = SummaryGrid.from_table(table)
    lines = []
    for transform in grid.transforms:
        kinds = [kind for _, kind in grid.cells[transform].values()]
        values = {layer: value for layer, (value, kind) in grid.cells[transform].items() if kind != "missing"}
        measured = len(values)
        if not measured:
            line = f"{transform}: no number at any layer (column why_missing)"
        else:
            worst = max(values, key=values.get)
            counts = [f"{kinds.count(kind)} {kind}" for kind in ("aligned", "partly", "not aligned") if kinds.count(kind)]
            line = f"{transform}: {', '.join(counts)} of {measured}; worst {values[worst]:.2f} at {worst}"
        agree = grid.agreement.get(transform)
        if agree is not None and math.isfinite(agree[0]):
            line += f"; output agrees {agree[0]:.2f}"
        lines.append(line if len(line) <= limit else line[: limit - 1] + "…")
    return lines


def images_needed(table: pd.DataFrame) -> tuple[int, int, int] | None:
    """When the 95% intervals overlap for most transform pairs at most layers: (overlapping pairs, pairs, images
    that would separate the typical pair); ``None`` when the transforms are told apart.

    Interval half-widths shrink as 1 / sqrt(n): a pair whose half-widths add up to ``f`` times the
    distance between its means needs about ``n f²`` images.
    """
    rows = table[is_layer_row(table) & (table["transform"] != "identity")].dropna(subset=["aligned_error_ci_low", "aligned_error_ci_high"])
    if "sweep" in rows:
        rows = rows[rows["sweep"].fillna("").astype(str) == ""]
    transforms = list(dict.fromkeys(rows["transform"]))
    factors, overlapping, total = [], 0, 0
    for i, a in enumerate(transforms):
        for b in transforms[i + 1:]:
            ra = rows[rows["transform"] == a].set_index("layer")
            rb = rows[rows["transform"] == b].set_index("layer")
            shared = ra.index.intersection(rb.index)
            if not len(shared):
                continue
            total += 1
            half = ((ra.loc[shared, "aligned_error_ci_high"] - ra.loc[shared, "aligned_error_ci_low"])
                    + (rb.loc[shared, "aligned_error_ci_high"] - rb.loc[shared, "aligned_error_ci_low"])) / 2
            gap = (ra.loc[shared, "aligned_error"] - rb.loc[shared, "aligned_error"]).abs()
            over = half >= gap
            if over.sum() > len(shared) / 2:
                overlapping += 1
                factors.extend((half[over] / gap[over].clip(lower=1e-3)).tolist())
    if total == 0 or overlapping <= total / 2:
        return None
    n = int(rows["n_images"].max())
    factor = float(pd.Series(factors).median())
    return overlapping, total, min(100_000, int(math.ceil(n * factor * factor)))
