"""Verdicts and warnings: the sentences a reader gets from an alignment table.

One sentence per transform (:func:`verdicts`) and the caveats that qualify the numbers
(:func:`report_warnings`): both the terminal and report.html print these, so each is written once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

HALF_CHANCE = 0.5
FLOOR_MARGIN = 0.01  # a floor above the aligned error by less than 1% of chance is rounding, not a finding


def floor_above_aligned(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose floor error exceeds their aligned error (by more than ``FLOOR_MARGIN``): there the floor is no lower bound.

    The floor compares F(x) with F(g^-1(g x)); the image round trip blacks out
    content that deep layers' receptive fields reach even inside the compared
    cells, which the aligned comparison never sees (scalings that enlarge).
    """
    return table[table["floor_error"] > table["aligned_error"] + FLOOR_MARGIN]


def _floor_sentence(group: pd.DataFrame) -> str:
    above = floor_above_aligned(group)
    if above.empty:
        return ""
    cells = ", ".join(f"{r['layer']} ({r['floor_error']:.2f} > {r['aligned_error']:.2f})" for _, r in above.iterrows())
    return (f". The floor is above the aligned error at {cells}: the image round trip g^-1(g x) loses content that "
            f"these layers see, so there the floor is a reference, not a lower bound")


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
    layers' measured lattices (:func:`frame_comparison`), where measured. A
    transform with an output row gets a second sentence: how often the
    model's top-1 class changes (:func:`~alignscope.measure.prediction.prediction_sentence`).
    """
    from .output_rows import is_layer_row, is_output_row, prediction_sentence

    lines = []
    for (model, transform), rows in table.groupby(["model", "transform"], sort=False):
        output = is_output_row(rows)
        group = rows[is_layer_row(rows)].sort_values("depth")
        prediction = [prediction_sentence(row, f"{transform}" if table["model"].nunique() == 1 else f"{model} {transform}")
                      for _, row in rows[output].iterrows()]
        if group.empty:
            lines.extend(prediction)
            continue
        failing = group[group["aligned_error"] > HALF_CHANCE]
        worst = group.loc[group["aligned_error"].idxmax()] if group["aligned_error"].notna().any() else None
        prefix = f"{transform}" if table["model"].nunique() == 1 else f"{model} {transform}"
        if worst is None:
            reasons = group["why_missing"].dropna().astype(str) if "why_missing" in group else pd.Series(dtype=str)
            reasons = reasons[reasons != ""]
            if len(reasons):
                heads = reasons.str.split(":").str[0].value_counts(sort=False)
                if len(heads) == 1:
                    detail = reasons.iloc[0] if reasons.nunique() == 1 else f"{heads.index[0]} at every layer"
                else:
                    detail = ", ".join(f"{head} at {count} layer(s)" for head, count in heads.items())
                lines.append(f"{prefix}: not measured; {detail} (column why_missing)")
            elif "n_images" in group and (group["n_images"] == 0).all():
                lines.append(f"{prefix}: not measured, no image counted at any layer")
            else:
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
            lines[-1] += _floor_sentence(group)
            lines[-1] += frame_comparison(group)
        lines.extend(prediction)
    from .placement import placement_verdicts

    return lines + placement_verdicts(table, limit=10_000)


_LATTICE_REASON_LABELS = (
    ("global", "global"), ("only input size", "global at the model's size"), ("float32", "support below float32"),
    ("not one lattice", "not one lattice"), ("not a lattice", "not one lattice"), ("reaches past", "support past the probe"),
    ("probe failed", "probe failed"), ("zero gradient", "zero gradient"), ("does not depend", "constant"))


def lattice_reason_label(reason: str) -> str:
    """A short label for why a layer has no measured lattice (see :mod:`alignscope.model.lattice_probe`)."""
    return next((label for key, label in _LATTICE_REASON_LABELS if key in reason), "other")


def no_lattice_sentence(no_lattice: dict[str, str], names_per_reason: int = 12) -> str:
    """One sentence naming every layer without a lattice, grouped by reason (``""`` when there is none).

    The log line and the report's warning are this same sentence; run.json's
    ``no_lattice`` holds each layer's full reason.
    """
    if not no_lattice:
        return ""
    groups: dict[str, list[str]] = {}
    for layer, reason in no_lattice.items():
        groups.setdefault(lattice_reason_label(reason), []).append(layer)
    parts = []
    for label, layers in groups.items():
        shown = ", ".join(layers[:names_per_reason])
        more = f" and {len(layers) - names_per_reason} more" if len(layers) > names_per_reason else ""
        parts.append(f"{label}: {shown}{more}")
    first, reason = next(iter(no_lattice.items()))
    return (f"no lattice measured for {len(no_lattice)} layer(s), so their registered_error is NaN ({'; '.join(parts)}); "
            f"e.g. {first}: {reason} (run.json no_lattice gives each reason)")


def report_warnings(table: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Every caveat a reader of the report must see, one sentence each, from the table and run.json.

    Restates what the run logged (unreadable images, images left out for a
    zero chance distance) so the report carries it, and adds what the numbers
    alone hide: random weights, skipped layers, rows without valid cells and
    floors above the measurement.
    """
    from .output_rows import is_layer_row

    output = ~is_layer_row(table)  # output and placement rows: no distances
    lines = []
    if meta.get("pretrained") is False or ("pretrained" in table and not table["pretrained"].astype(str).str.lower().eq("true").all()):
        lines.append("RANDOM WEIGHTS: the model is not pretrained; the numbers describe an untrained network")
    skipped = meta.get("images_skipped") or []
    if skipped:
        listed = "; ".join(f"{Path(str(s.get('path', s))).name} ({s.get('reason', '?')})" if isinstance(s, dict) else str(s)
                           for s in skipped[:10])
        lines.append(f"{len(skipped)} file(s) left out (unreadable, or not an image): {listed}"
                     f"{' ...' if len(skipped) > 10 else ''}")
    for entry in meta.get("layers_skipped") or []:
        lines.append(f"layer {entry.get('layer')} skipped: {entry.get('reason')}")
    used = len(meta.get("images_used") or [])
    from .caveats import chance_collapse_caveat, left_out_caveat, nonfinite_caveat

    layer_table = table[~output]
    # the same sentences the run logged, so the report carries them
    lines += [c for c in (nonfinite_caveat(table, used), chance_collapse_caveat(table),
                          left_out_caveat(layer_table, used) if used and "n_images" in table else "") if c]
    from .grid import images_needed

    small = images_needed(table)
    if small is not None:
        overlapping, pairs, needed = small
        lines.append(f"too few images to tell the transforms apart: with n = {int(table['n_images'].max())} the 95% "
                     f"intervals overlap at most layers for {overlapping} of {pairs} transform pairs; about {needed} "
                     f"images would separate the typical pair (--images DIR --max-images {needed})")
    empty = table[table["aligned_error"].isna() & ~output]
    if len(empty):
        lines.append(f"{len(empty)} row(s) have no valid cells and no aligned_error: "
                     + ", ".join(f"{r['layer']} / {r['transform']}" for _, r in empty.head(8).iterrows()))
    for column, what in (("permuted_error", "channel permutation"), ("channel_mapped_error", "linear channel map"),
                         ("optimal_error", "family warp"), ("optimal_affine_error", "affine warp")):
        if column not in table:
            continue
        worse = table[(table[column] > table["aligned_error"] + FLOOR_MARGIN) & ~output]
        if len(worse):
            cells = ", ".join(f"{r['layer']} / {r['transform']} ({r[column]:.2f} > {r['aligned_error']:.2f})"
                              for _, r in worse.head(6).iterrows())
            calibration = int(table["n_calibration"].max()) if "n_calibration" in table else None
            on = f" on {calibration} calibration images" if calibration else ""
            lines.append(f"the {what} fitted{on} is worse than g^-1 alone on the held-out images at {len(worse)} "
                         f"row(s): {cells}{' ...' if len(worse) > 6 else ''}; it does not carry over to new images "
                         f"(too few calibration images for its parameters?), so {column} there is no alignment")
    from .placement import identity_caveat

    lines += identity_caveat(table)
    for entry in (meta.get("placement") or {}).get("layers_left_out") or []:
        lines.append(f"placement at {entry.get('layer')} left out: {entry.get('reason')}")
    missing_lattices = no_lattice_sentence(meta.get("no_lattice") or {})
    if missing_lattices:
        lines.append(missing_lattices)
    border = meta.get("registered_border") or []
    if border:
        listed = ", ".join(f"{b['layer']} / {b['transform']} ({','.join(f'{v:g}' for v in b['shift_px'])} px)"
                           for b in border[:8])
        lines.append(f"registered comparison keeps border effects at {listed}{' ...' if len(border) > 8 else ''}: every "
                     "cell's support there reaches past the image, so no cell is free of the shift's border "
                     "(registered_fraction = valid_fraction)")
    above = floor_above_aligned(table)
    if len(above):
        cells = ", ".join(f"{r['transform']} at {r['layer']} ({r['floor_error']:.2f} > {r['aligned_error']:.2f})"
                          for _, r in above.head(8).iterrows())
        lines.append(f"floor above the aligned error: {cells}{' ...' if len(above) > 8 else ''}; the image round trip "
                     "g^-1(g x) loses content these layers see, so there the floor is a reference, not a lower bound")
    return lines
