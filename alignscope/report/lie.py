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


def lie_text(table: pd.DataFrame) -> str:
    """The table as fixed-width text (``""`` without Lie-derivative rows)."""
    wide = lie_table(table)
    if wide.empty:
        return ""
    shown = wide.drop(columns="unit")
    head = ("Lie derivatives: ‖L F‖ / chance distance per unit t (0: equivariant); output: mean |dp/dt| over classes\n"
            "t: per radian (rotate), half image side (translations), log-scale (scale), tan(angle) (shears)")
    return head + "\n" + shown.to_string(float_format=lambda v: f"{v:.3g}")
