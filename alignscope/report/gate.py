"""A pass/fail gate on an alignment table: the rows that break numeric limits.

``check(table, max={"aligned_error": 0.5}, min={"prediction_agreement": 0.9})``
returns the rows (optionally restricted to some layers and transforms) where a
limited column is above its ``max`` or below its ``min``, with a ``breaks``
column saying which limit and by what value. A limit on a cell that is NaN
breaks too: a gate must not pass what it could not check. Limits on a column
the table does not have, or filters that select no row, are usage errors for
the same reason.

A table with output rows (the model's prediction, ``kind`` = ``"output"``)
holds more than one kind of row: a limit on a ``prediction_*`` column checks the
output rows, one on a ``placed_*`` / ``placement_*`` column the placement rows
(``--placement``), a limit on any other column the layer rows, so that
``--max aligned_error=0.5`` does not fail on the output rows' empty
``aligned_error``. A limit that the filters leave no row of its kind for is
a usage error too.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Sequence

import pandas as pd

from ..columns import limitable_columns
from ..errors import UsageError
from .output_rows import LIE_KIND, OUTPUT_KIND, PLACEMENT_KIND, column_kind, rows_for_column

Limits = Mapping[str, float] | Iterable[str] | None


def validate_limit_columns(columns: Iterable[str], option: str) -> None:
    """Refuse a limit on a column no analysis writes, naming the closest ones (before any work)."""
    import difflib

    known = limitable_columns()
    for column in columns:
        if column not in known:
            close = difflib.get_close_matches(column, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "see docs/measures.md for the columns"
            raise UsageError(f"{option}: no analysis writes a column {column!r}; {hint}")


def parse_limit(text: str, option: str = "--max") -> tuple[str, float]:
    """``"aligned_error=0.5"`` -> ``("aligned_error", 0.5)``; a usage error naming ``option`` otherwise."""
    column, sep, number = str(text).partition("=")
    column = column.strip()
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not sep or not column or not math.isfinite(value):
        raise UsageError(f"{option} {text!r} is not COLUMN=NUMBER with a finite number; write e.g. {option} aligned_error=0.5")
    return column, value


def _limits(limits: Limits, option: str) -> dict[str, float]:
    if limits is None:
        return {}
    if isinstance(limits, Mapping):
        return {str(k): float(v) for k, v in limits.items()}
    if isinstance(limits, str):
        limits = [limits]
    strictest = min if option == "--max" else max  # a repeated column keeps its strictest limit, never the last
    parsed: dict[str, float] = {}
    for text in limits:
        column, value = parse_limit(text, option)
        parsed[column] = strictest(parsed[column], value) if column in parsed else value
    return parsed


def _select(table: pd.DataFrame, column: str, patterns: Sequence[str] | None, what: str) -> pd.Series:
    """Rows whose ``column`` matches any of ``patterns`` (exact or glob); all rows without patterns."""
    if not patterns:
        return pd.Series(True, index=table.index)
    values = table[column].astype(str)
    keep = pd.Series(False, index=table.index)
    for pattern in patterns:
        hit = values.map(lambda v, p=pattern: v == p or fnmatch.fnmatchcase(v, p))
        if not hit.any():
            known = ", ".join(dict.fromkeys(values))
            raise UsageError(f"{what} {pattern!r} matches no row (the table has: {known}); fix the name or drop the filter")
        keep |= hit
    return keep


def check(table: pd.DataFrame, max: Limits = None, min: Limits = None, layers: Sequence[str] | None = None,  # noqa: A002
          transforms: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``table`` that break a limit, with a ``breaks`` column; empty when every row passes.

    ``max`` / ``min``: ``{column: limit}`` or strings ``"column=limit"``;
    a row breaks ``max`` when its value is above the limit, ``min`` when below,
    and either when the value is NaN (``prediction_*`` limits apply to the
    output rows only, ``placed_*`` limits to the placement rows, all others to the layer rows; see the module docstring). ``layers`` / ``transforms``: names or
    globs the check is restricted to (each must match some row).
    """
    upper, lower = _limits(max, "--max"), _limits(min, "--min")
    if not upper and not lower:
        raise UsageError("no limit given; pass at least one --max COLUMN=NUMBER or --min COLUMN=NUMBER")
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    for column in [*upper, *lower]:
        if column not in table.columns:
            raise UsageError(f"no column {column!r} in the table; numeric columns are: {', '.join(numeric)}")
        if column not in numeric:
            raise UsageError(f"column {column!r} is not numeric; limits apply to: {', '.join(numeric)}")
    scope = table[_select(table, "layer", layers, "layer") & _select(table, "transform", transforms, "transform")]
    reasons = pd.Series([[] for _ in range(len(scope))], index=scope.index, dtype=object)
    for column, limit, sign, word in [(c, v, 1, ">") for c, v in upper.items()] + [(c, v, -1, "<") for c, v in lower.items()]:
        applies = rows_for_column(scope, column)
        if not applies.any():
            kind = {OUTPUT_KIND: "output rows (the model's prediction)", PLACEMENT_KIND: "placement rows (--placement)",
                    LIE_KIND: "Lie-derivative rows (--lie)"
                    }.get(column_kind(column), "layer rows")
            raise UsageError(f"{column} is measured on the {kind}, and the --layers/--transforms filters leave none; "
                             "widen the filters or drop the limit")
        values = scope[column].astype(float)
        broken = applies & (values.isna() | (sign * (values - limit) > 0))
        for index in scope.index[broken]:
            value = values[index]
            reasons[index].append(f"{column} is NaN (cannot be checked)" if math.isnan(value) else f"{column} {value:.4g} {word} {limit:g}")
    failing = scope.loc[reasons.map(bool)].copy()
    failing["breaks"] = reasons[failing.index].map("; ".join)
    return failing


def gate_summary(failing: pd.DataFrame, checked: int) -> str:
    """One line: how many of the checked rows break the limits."""
    if failing.empty:
        return "the checked row is within the limits" if checked == 1 else f"all {checked} checked rows are within the limits"
    return f"{len(failing)} of {checked} checked rows break the limits"


def checked_rows(table: pd.DataFrame, layers: Sequence[str] | None = None, transforms: Sequence[str] | None = None,
                 columns: Sequence[str] = ()) -> int:
    """How many rows a check with these filters and limited ``columns`` looks at.

    A row counts when at least one limited column applies to its kind
    (prediction columns to output rows, the others to layer rows); without
    ``columns``, every row the filters select.
    """
    scope = _select(table, "layer", layers, "layer") & _select(table, "transform", transforms, "transform")
    if columns:
        applies = pd.Series(False, index=table.index)
        for column in columns:
            applies |= rows_for_column(table, column)
        scope &= applies
    return int(scope.sum())
