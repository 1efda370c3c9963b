"""The output rows of an alignment table: telling them from layer rows, and reading them.

The rows :mod:`alignscope.measure.prediction` measures (the model's prediction
under each transform) sit in the same table as the layer rows, after them,
with ``kind`` = ``"output"`` (``"layer"`` for the others; a table without
the column has layer rows only). Their own columns start with
``prediction_``; the layer rows' distances are empty there. Only pandas
here, so that reading a CSV (``plot``, ``check``, ``compare``) does not
import torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

OUTPUT_KIND = "output"  # value of the ``kind`` column for the output rows (layer rows: "layer")
OUTPUT_LAYER = "output"  # the output row's ``layer``
PREDICTION_PREFIX = "prediction_"  # every column of the output rows' own measurements starts with it


def output_layer_name(layer_names: Sequence[str]) -> str:
    """:data:`OUTPUT_LAYER`, or ``"model output"`` where a selected layer already has that name."""
    return OUTPUT_LAYER if OUTPUT_LAYER not in layer_names else "model output"


def with_output_rows(table: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """``table`` (layer rows, ``kind`` set to ``"layer"``) followed by ``records``; integer columns stay integers."""
    table = table.assign(kind="layer")
    if not records:
        return table
    combined = pd.concat([table, pd.DataFrame.from_records(records)], ignore_index=True)
    for column in table.columns:
        if pd.api.types.is_integer_dtype(table[column]) and not pd.api.types.is_integer_dtype(combined[column]):
            combined[column] = combined[column].astype("Int64")  # a column the output rows lack: empty, not 12.0
    return combined


def is_output_row(table: pd.DataFrame) -> pd.Series:
    """True for the output rows (``kind`` = ``"output"``); all False for a table without a ``kind`` column."""
    if "kind" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["kind"].astype(str).eq(OUTPUT_KIND)


def layer_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows measuring layers (every row of a table without output rows)."""
    return table[~is_output_row(table)]


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
