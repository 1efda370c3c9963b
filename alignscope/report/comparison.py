"""Several reports side by side: one combined table, what the runs share, and a wide summary.

Runs are told apart by their ``model`` column; two runs of the same model get
their folder name appended so their rows stay separate. Transforms are
matched by their canonical spec, whether they came from a sweep or not, so a
run measured with ``rotate:0:90:15`` meets one measured with ``rotate45``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import UsageError

log = logging.getLogger("alignscope")


def validate_distinct_runs(paths: Sequence[str | Path]) -> None:
    """Refuse fewer than two CSVs, or one file given twice: a comparison with itself shows nothing."""
    if len(paths) < 2:
        raise UsageError("compare needs at least two alignment.csv files; pass the reports to compare")
    seen: dict[Path, str] = {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise UsageError(f"{path} is the same file as {seen[key]}; pass each report once")
        seen[key] = str(path)


def combine_runs(tables: Sequence[pd.DataFrame], paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate report tables; every run of a model that more than one run measured is labelled
    ``model (<folder>)``, so each run stays its own and none is the unlabelled "real" one."""
    names = [table["model"].iloc[0] if table["model"].nunique() == 1 else None for table in tables]
    repeated = {name for name in names if name is not None and names.count(name) > 1}
    combined = []
    for index, (table, path, name) in enumerate(zip(tables, paths, names)):
        table = table.copy()
        if name in repeated:
            table["model"] = f"{name} ({Path(path).parent.name or index})"
        combined.append(table)
    labels = [t["model"].iloc[0] for t in combined if t["model"].nunique() == 1]
    if len(labels) != len(set(labels)):  # two runs in folders of the same name: fall back to their order
        for index, table in enumerate(combined):
            if names[index] in repeated:
                table["model"] = f"{names[index]} (run {index + 1}: {Path(paths[index]).parent.name})"
    return pd.concat(combined, ignore_index=True)


def prediction_comparison(combined: pd.DataFrame, value: str = "prediction_agreement") -> pd.DataFrame:
    """Wide table of an output-row ``value`` (the model's prediction): one row per transform, one column per run.

    Output rows sit at a different depth in each model, so they are matched by transform alone; like
    :func:`comparison_table`, only transforms every run measured are kept. Empty when no run has output rows.
    """
    from .output_rows import is_output_row

    output = combined[is_output_row(combined)] if "kind" in combined else combined.iloc[:0]
    if output.empty or value not in output:
        return pd.DataFrame()
    output = output[output["transform"].isin(overlap(combined).shared)]
    if output.empty:
        return pd.DataFrame()
    wide = output.pivot_table(index="transform", columns="model", values=value, sort=False)
    return wide.reindex(columns=[m for m in dict.fromkeys(combined["model"]) if m in wide.columns])


def run_sizes(combined: pd.DataFrame) -> dict[str, int]:
    """Images each run measured (its rows' largest ``n_images``), by run label."""
    return {str(model): int(rows["n_images"].max()) for model, rows in combined.groupby("model", sort=False)}


@dataclass
class Overlap:
    """Which transforms every run measured (``shared``) and which only some did (``partial``: spec -> runs)."""

    shared: list[str]
    partial: dict[str, list[str]]

    def warning(self) -> str | None:
        """One line for the user when runs do not fully overlap, else None."""
        if not self.partial:
            return None
        listed = "; ".join(f"{spec} only in {', '.join(runs)}" for spec, runs in list(self.partial.items())[:6])
        more = f" (and {len(self.partial) - 6} more)" if len(self.partial) > 6 else ""
        if not self.shared:
            return (f"the runs share no transform ({listed}{more}): the figure shows each in its own panels and "
                    "there is no common row to compare; measure a common transform in every run")
        return f"transforms not measured in every run are left out of the comparison table: {listed}{more}"


def overlap(combined: pd.DataFrame) -> Overlap:
    """Transforms (identity aside) measured by every model in ``combined`` and those measured by only some."""
    models = list(dict.fromkeys(combined["model"]))
    by_spec = combined[combined["transform"] != "identity"].groupby("transform", sort=False)["model"].unique()
    shared = [spec for spec, runs in by_spec.items() if len(runs) == len(models)]
    partial = {spec: [m for m in models if m in set(runs)] for spec, runs in by_spec.items() if len(runs) < len(models)}
    return Overlap(shared, partial)


def comparison_table(combined: pd.DataFrame, value: str = "aligned_error") -> pd.DataFrame:
    """Wide table of ``value``: one row per shared (transform, depth), one column per model; warns on partial overlap.

    Non-sweep rows win over sweep rows of the same spec within a run (they
    measure the same thing); rows only some runs have are left out, said once.
    """
    found = overlap(combined)
    note = found.warning()
    if note:
        log.warning(note)
    from .output_rows import is_layer_row

    layers = combined[is_layer_row(combined)] if "kind" in combined else combined  # outputs: prediction_comparison
    keyed = layers.assign(_sweep=(layers["sweep"].fillna("") != "") if "sweep" in layers else False)
    keyed = keyed.sort_values("_sweep", kind="stable").drop_duplicates(["model", "transform", "layer"])
    keyed = keyed[keyed["transform"].isin(found.shared)]
    if keyed.empty:
        return pd.DataFrame()
    order = {spec: i for i, spec in enumerate(found.shared)}
    runs = list(dict.fromkeys(combined["model"]))
    wide = keyed.pivot_table(index=["transform", "depth"], columns="model", values=value, sort=False)
    wide = wide.reindex(columns=runs)
    names = keyed.groupby(["transform", "depth"], sort=False)["layer"].agg(lambda v: " | ".join(dict.fromkeys(map(str, v))))
    wide.insert(0, "layer", names.reindex(wide.index))
    if len(runs) == 2 and f"{value}_ci_low" in keyed and f"{value}_ci_high" in keyed:
        # the second run minus the first, and whether their 95% intervals overlap (a difference they cannot tell)
        # a run with no number at all (every row NaN) keeps its column: pivot_table would drop it
        low = keyed.pivot_table(index=["transform", "depth"], columns="model", values=f"{value}_ci_low", sort=False,
                                dropna=False).reindex(index=wide.index, columns=runs)
        high = keyed.pivot_table(index=["transform", "depth"], columns="model", values=f"{value}_ci_high", sort=False,
                                 dropna=False).reindex(index=wide.index, columns=runs)
        a, b = runs
        wide["difference"] = wide[b] - wide[a]
        known = low[a].notna() & low[b].notna() & high[a].notna() & high[b].notna()
        wide["intervals_overlap"] = ((low[a] <= high[b]) & (low[b] <= high[a])).astype(object).where(known, None)
    return wide.sort_index(key=lambda level: level.map(order) if level.name == "transform" else level)
