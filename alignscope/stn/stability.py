"""Training stability of an STN run: did it diverge, did the warp collapse to doing nothing?

Definitions (one run = one variant and seed, judged at the end of training):

- **diverged**: the training loss became NaN or infinite (training stopped
  there, ``diverged_at_step``), or the final test accuracy is at most
  ``DIVERGED_ACCURACY_FACTOR`` (2) times chance (1 / classes): the classifier
  stopped learning.
- **collapsed** (runs with an STN that did not diverge): the learned warp
  undoes almost none of the rotation, ``angle_std_deg`` at least
  ``COLLAPSE_FRACTION`` (90%) of the no-compensation value 180 / sqrt(12) =
  51.96 deg (what no STN scores): the warp stayed near the identity or turns
  every digit alike.
- **stable**: neither. ``none`` and the ``supervised`` control have no
  collapse to speak of (their ``collapsed`` is empty).

The worst seed of a variant is the one with the largest ``angle_std_deg``
(a diverged seed counts as worst of all).
"""
from __future__ import annotations

import math

import pandas as pd

from .angles import NO_COMPENSATION_STD

DIVERGED_ACCURACY_FACTOR = 2.0
COLLAPSE_FRACTION = 0.9
COLLAPSE_ANGLE_DEG = COLLAPSE_FRACTION * NO_COMPENSATION_STD


def flags(results: pd.DataFrame, column: str) -> pd.Series:
    """``results[column]`` (``diverged`` or ``collapsed``) as booleans: empty cells (no STN, or runs saved before
    the column existed) count as False."""
    if column not in results:
        return pd.Series(False, index=results.index)
    return results[column].fillna(False).astype(bool)


def run_stability(variant: str, test_accuracy: float, angle_std_deg: float, diverged_at_step: int | None,
                  n_classes: int) -> dict:
    """``diverged`` (bool), ``collapsed`` (bool, or None without a learned STN) for one run; see the module docstring."""
    chance = 1.0 / n_classes
    failed = diverged_at_step is not None or (variant != "supervised" and not test_accuracy > DIVERGED_ACCURACY_FACTOR * chance)
    collapsed = None
    if variant not in ("none", "supervised"):
        collapsed = (not failed) and not (angle_std_deg < COLLAPSE_ANGLE_DEG)
    return {"diverged": bool(failed), "collapsed": collapsed}


def stability_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per variant (index): ``diverged_fraction``, ``collapsed_fraction`` (of the seeds), ``worst_seed`` and its
    ``angle_std_deg_worst`` and ``test_accuracy_worst``. Runs saved before these columns existed count as stable."""
    rows = {}
    for variant, part in results.groupby("variant", sort=False):
        diverged = flags(part, "diverged")
        collapsed = part["collapsed"] if "collapsed" in part else pd.Series(None, part.index, dtype=object)
        has_stn = collapsed.notna().any()
        # the worst seed: a diverged one first, then the largest angle_std_deg, then the lowest accuracy
        order = part.assign(_diverged=diverged, _angle=part["angle_std_deg"].fillna(math.inf),
                            _accuracy=-part["test_accuracy"].fillna(-math.inf))
        worst = order.sort_values(["_diverged", "_angle", "_accuracy"], ascending=False).iloc[0]
        rows[variant] = {
            "diverged_fraction": float(diverged.mean()),
            "collapsed_fraction": float(flags(part, "collapsed").mean()) if has_stn else math.nan,
            "worst_seed": int(worst["seed"]),
            "angle_std_deg_worst": float(worst["angle_std_deg"]),
            "test_accuracy_worst": float(worst["test_accuracy"]),
        }
    return pd.DataFrame.from_dict(rows, orient="index")
