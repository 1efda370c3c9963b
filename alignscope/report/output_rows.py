"""The kinds of row of an alignment table: telling them apart, and reading the output rows.

The rows :mod:`alignscope.measure.prediction` measures (the model's prediction
under each transform) sit in the same table as the layer rows, after them,
with ``kind`` = ``"output"`` (``"layer"`` for the others; a table without
the column has layer rows only). Their own columns start with
``prediction_``; the layer rows' distances are empty there. With
``--placement`` the placement rows (:mod:`alignscope.measure.placement`,
``kind`` = ``"placement"``) follow, with the ``placed_*`` and
``placement_drop`` columns. Only pandas here, so that reading a CSV
(``plot``, ``check``, ``compare``) does not import torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

OUTPUT_KIND = "output"  # value of the ``kind`` column for the output rows (layer rows: "layer")
OUTPUT_LAYER = "output"  # the output row's ``layer``
PREDICTION_PREFIX = "prediction_"  # every column of the output rows' own measurements starts with it
PLACEMENT_KIND = "placement"  # ``kind`` of the placement rows
PLACEMENT_PREFIXES = ("placed_", "placement_")  # the placement rows' own columns
LAYER_KIND = "layer"
LIE_KIND = "lie"  # ``kind`` of the Lie-derivative rows (``--lie``)
LIE_PREFIX = "lie_"


def output_layer_name(layer_names: Sequence[str]) -> str:
    """:data:`OUTPUT_LAYER`, or ``"model output"`` where a selected layer already has that name."""
    return OUTPUT_LAYER if OUTPUT_LAYER not in layer_names else "model output"


def with_output_rows(table: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """``table`` (layer rows, ``kind`` set to ``"layer"``) followed by ``records``; integer columns stay integers."""
    return _appended(table.assign(kind=LAYER_KIND), records)


def with_placement_rows(table: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """``table`` followed by the placement (or Lie-derivative) rows ``records``; integer columns stay integers."""
    return _appended(table, records)


def _appended(table: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    if not records:
        return table
    combined = pd.concat([table, pd.DataFrame.from_records(records)], ignore_index=True)
    for column in table.columns:
        if pd.api.types.is_integer_dtype(table[column]) and not pd.api.types.is_integer_dtype(combined[column]):
            combined[column] = combined[column].astype("Int64")  # a column the added rows lack: empty, not 12.0
    return combined


def is_output_row(table: pd.DataFrame) -> pd.Series:
    """True for the output rows (``kind`` = ``"output"``); all False for a table without a ``kind`` column."""
    if "kind" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["kind"].astype(str).eq(OUTPUT_KIND)


def is_placement_row(table: pd.DataFrame) -> pd.Series:
    """True for the placement rows (``kind`` = ``"placement"``)."""
    if "kind" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["kind"].astype(str).eq(PLACEMENT_KIND)


def is_lie_row(table: pd.DataFrame) -> pd.Series:
    """True for the Lie-derivative rows (``kind`` = ``"lie"``)."""
    if "kind" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["kind"].astype(str).eq(LIE_KIND)


def is_layer_row(table: pd.DataFrame) -> pd.Series:
    """True for the rows measuring layers under finite transforms (every row of a table without a ``kind``
    column; an empty ``kind`` counts as a layer row)."""
    if "kind" not in table.columns:
        return pd.Series(True, index=table.index)
    kind = table["kind"].astype(str)
    return kind.eq(LAYER_KIND) | table["kind"].isna() | kind.eq("")


def layer_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows measuring layers (every row of a table without output rows)."""
    return table[is_layer_row(table)]


def placement_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[is_placement_row(table)]


def is_placement_column(column: str) -> bool:
    """Columns measured on the placement rows only."""
    return str(column).startswith(PLACEMENT_PREFIXES)


def column_kind(column: str) -> str:
    """The kind of row a column is measured on: ``output``, ``placement``, ``lie`` or ``layer``."""
    if is_prediction_column(column):
        return OUTPUT_KIND
    if is_placement_column(column):
        return PLACEMENT_KIND
    return LIE_KIND if str(column).startswith(LIE_PREFIX) else LAYER_KIND


def rows_for_column(table: pd.DataFrame, column: str) -> pd.Series:
    """The rows a limit on ``column`` checks: the rows of its kind; for the Lie-derivative columns the model-output
    rows (``lie_output``) or the layer rows (the others)."""
    rows = rows_of_kind(table, column_kind(column))
    if str(column).startswith("placement_drop") and "depth" in table.columns:
        rows &= pd.to_numeric(table["depth"], errors="coerce").fillna(0) > 0  # the input has no place before it
    if column_kind(column) == LIE_KIND and "module" in table.columns:
        output = table["module"].astype(str).eq("model output")
        rows &= output if str(column).startswith("lie_output") else ~output
    return rows


def rows_of_kind(table: pd.DataFrame, kind: str) -> pd.Series:
    """The boolean mask of ``table``'s rows of ``kind`` (``output``, ``placement``, ``layer``)."""
    return {OUTPUT_KIND: is_output_row, PLACEMENT_KIND: is_placement_row, LIE_KIND: is_lie_row,
            LAYER_KIND: is_layer_row}[kind](table)


def output_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[is_output_row(table)]


def is_prediction_column(column: str) -> bool:
    """Columns measured on the output rows only (NaN on layer rows)."""
    return str(column).startswith(PREDICTION_PREFIX)


def prediction_sentence(row: pd.Series, prefix: str) -> str:
    """One verdict sentence for an output row: how often the top-1 class changes under the transform."""
    n = int(row["n_images"]) if pd.notna(row["n_images"]) else 0
    agreement = row["prediction_agreement"]
    if n == 0 or pd.isna(agreement):
        return f"{prefix} prediction: no finite model outputs to compare"
    changed = n - int(round(agreement * n))
    sentence = (f"{prefix} prediction: the top-1 class changes for {100 * (1 - agreement):.1f}% of images under "
                f"{row['transform']} ({changed} of {n}; agreement {agreement:.3f}, 95% Wilson CI "
                f"{row['prediction_agreement_ci_low']:.3f}-{row['prediction_agreement_ci_high']:.3f}; two unrelated "
                f"images agree {row['prediction_agreement_chance']:.3f}); mean KL(p(x) || p(g x)) "
                f"{row['prediction_kl']:.3g} nats (unrelated images {row['prediction_kl_chance']:.3g})")
    floor = row.get("prediction_agreement_floor", math.nan)
    if not bool(row.get("exact", True)) and pd.notna(floor):
        sentence += f"; the image round trip g^-1(g x) alone changes {100 * (1 - floor):.1f}%"
    return sentence


PREDICTION_SUMMARY = ("layer", "transform", "prediction_agreement", "prediction_agreement_ci_low",
                      "prediction_agreement_ci_high", "prediction_agreement_chance", "prediction_kl", "n_images")
