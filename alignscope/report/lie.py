"""Reading the Lie-derivative rows (``--lie``): one generator × layer table, in the terminal and report.html.

Cells are ``lie_error`` (‖L F‖ over the chance distance, per unit t of the generator), the last
column the output's ``lie_output`` (mean |d p_k / dt|, Gruver et al.'s metric). Only pandas here.
"""
from __future__ import annotations

import pandas as pd

from .output_rows import is_lie_row

OUTPUT_COLUMN = "output |dp/dt|"


def lie_table(table: pd.DataFrame) -> pd.DataFrame:
    """Generators × layers of ``lie_error`` (layers by depth), with the output's ``lie_output`` and the unit;
    empty without Lie-derivative rows."""
    rows = table[is_lie_row(table)]
    if rows.empty:
        return pd.DataFrame()
    output = rows["module"].astype(str).eq("model output")
    layers = rows[~output].sort_values("depth", kind="stable")
    wide = layers.pivot_table(index="transform", columns="layer", values="lie_error", sort=False)
    wide = wide.reindex(columns=list(dict.fromkeys(layers["layer"])))
    if output.any() and "lie_output" in rows:
        wide[OUTPUT_COLUMN] = rows[output].set_index("transform")["lie_output"].reindex(wide.index)
    wide["unit"] = rows.drop_duplicates("transform").set_index("transform")["lie_unit"].reindex(wide.index)
    wide.index = [str(name).removeprefix("lie-") for name in wide.index]
    wide.index.name = "generator"
    return wide


def lie_text(table: pd.DataFrame, width: int = 80) -> str:
    """The table as fixed-width text, layers that do not fit in ``width`` columns in further blocks (``""``
    without Lie-derivative rows)."""
    from .grid import short_name

    wide = lie_table(table)
    if wide.empty:
        return ""
    columns = [c for c in wide.columns if c != "unit"]
    first, cell = max(11, *(len(str(g)) for g in wide.index)) + 1, 10
    per_block = max(1, (width - first) // cell)
    head = ["Lie derivatives per unit t: ‖L F‖ / chance distance (0 = equivariant)",
            *(["output: mean |dp/dt| over the classes"] if OUTPUT_COLUMN in columns else []),
            "t: radians, half image sides (translations), log-scale, tan(angle) (shears)"]
    lines = list(head)
    if len(columns) > 16:  # --layers all: the blocks would fill screens; the output and the pointer say it
        lines.append(f"{len(columns) - (OUTPUT_COLUMN in columns)} layers: see report.html, or alignment.csv (kind = lie)")
        columns = [OUTPUT_COLUMN] if OUTPUT_COLUMN in columns else []
    for start in range(0, len(columns), per_block):
        block = columns[start:start + per_block]
        labels = ["output" if c == OUTPUT_COLUMN else short_name(str(c), cell - 1) for c in block]
        lines.append("generator".ljust(first) + "".join(label.rjust(cell) for label in labels))
        for generator, row in wide.iterrows():
            lines.append(str(generator).ljust(first) + "".join(_number(row[c]).rjust(cell) for c in block))
    return "\n".join(lines)


def _number(value: float) -> str:
    """Three significant digits, trailing zeros kept (38.0 next to 40.4), no exponent above 1e-4."""
    if pd.isna(value):
        return "·"
    return f"{value:#.3g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"
