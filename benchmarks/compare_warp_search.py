"""The warp search of this tree against that of an earlier revision, on the same calibration maps.

The calibration maps of a fitted run are captured once (default model, bundled photos, the default
transforms and stages, the calibration split ``alignscope analyze --optimal family --optimal affine``
would use), then for every (layer, transform) both implementations run what :class:`Calibrator.fit`
runs: the family search from g^-1 and the registered start, then the affine search from those and the
family optimum. The two run back to back per pair, in alternating order, so both see the same load;
the ratio of their summed times is the speed-up. For each fit it reports whether the two found the
same warp: the largest displacement between the two sampling matrices over the valid cells (in
cells), their charged calibration losses, and whether each kept g^-1.

Run:  python benchmarks/compare_warp_search.py --baseline 27b903a            # all 5 stages x 9 transforms
      python benchmarks/compare_warp_search.py --baseline 27b903a --json out.json --maps /tmp/maps.pt

``--baseline`` is any git revision of this repository whose ``alignscope/fit/search.py`` and
``warpscore.py`` define ``search_warp``; ``--maps`` keeps the captured maps in a file and reuses them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import alignscope
from alignscope.fit import fitting
from alignscope.fit import search as warpsearch
from alignscope.geometry.transforms import parse_transform

ROOT = Path(__file__).resolve().parents[1]


class _Captured(Exception):
    pass


def capture_maps(model: str, max_images: int, transforms: list[str] | None, layers: list[str] | None) -> list[dict]:
    """The calibration maps, masks, chance distances and registered starts of every (layer, transform)."""
    captured: list[dict] = []

    def grab(self, progress=None):
        for key, slot in self.collected.items():
            pair = self.pairs[key]
            captured.append({"layer": key[0], "transform": pair.transform.spec, "stride": float(pair.stride),
                             "reference": torch.cat(slot.references), "moved": torch.cat(slot.moved),
                             "mask": slot.mask, "chance": torch.cat(slot.chance),
                             "starts": [np.asarray(m) for m in self._registered_start(pair)]})
        raise _Captured

    original = fitting.Calibrator.fit
    fitting.Calibrator.fit = grab
    try:
        alignscope.analyze(model, transforms=transforms, layers=layers, max_images=max_images,
                           optimal=["family", "affine"])
    except _Captured:
        pass
    finally:
        fitting.Calibrator.fit = original
    if not captured:
        sys.exit("no calibration maps were captured")
    return captured


def load_baseline(revision: str):
    """The baseline's warpsearch module, loaded from ``git show`` into a temporary package."""
    folder = Path(tempfile.mkdtemp(prefix="warpsearch-baseline-"))
    package = folder / "warpsearch_baseline"
    package.mkdir()
    for name in ("warpsearch.py", "warpscore.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:alignscope/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (package / name).write_text(text)
    (package / "__init__.py").write_text("")
    (package / "transforms.py").write_text("from alignscope.geometry.transforms import *  # noqa\n"
                                           "from alignscope.geometry.transforms import _fmt  # noqa\n")
    sys.path.insert(0, str(folder))
    return importlib.import_module("warpsearch_baseline.warpsearch")


def fit_pair(module, item: dict, steps: int, kinds: tuple[str, ...]) -> tuple[dict, float]:
    """What Calibrator.fit runs for one pair, with ``module``'s search_warp; returns the fits and seconds."""
    g = parse_transform(item["transform"])[0]
    args = (item["reference"], item["moved"], item["mask"], item["chance"], g, item["stride"])
    started = time.perf_counter()
    if hasattr(module, "search_warps"):  # one set-up shared by both searches, as Calibrator.fit runs it
        fits = module.search_warps(*args, [k for k in module.SEARCH_KINDS if k in kinds], steps, starts=list(item["starts"]))
        return fits, time.perf_counter() - started
    fits, family = {}, None
    if "family" in kinds:
        family = fits["family"] = module.search_warp(*args, "family", steps, starts=list(item["starts"]))
    if "affine" in kinds:
        fits["affine"] = module.search_warp(*args, "affine", steps,
                                            starts=list(item["starts"]) + ([] if family is None else [family.matrix]))
    return fits, time.perf_counter() - started


def displacement_cells(first: np.ndarray, second: np.ndarray, mask: torch.Tensor) -> float:
    """Largest distance, in cells of the map, between where two sampling matrices take a valid cell from."""
    height, width = mask.shape
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if len(xs) == 0:
        return math.nan
    q = np.stack([(2 * xs.numpy() + 1) / width - 1, (2 * ys.numpy() + 1) / height - 1, np.ones(len(xs))])
    d = (np.asarray(first)[:2] - np.asarray(second)[:2]) @ q
    return float(np.max(np.hypot(d[0] * width / 2, d[1] * height / 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision holding the search to compare with")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--transform", action="append", help="default: the default set")
    parser.add_argument("--layers", action="append")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kind", action="append", choices=warpsearch.SEARCH_KINDS)
    parser.add_argument("--pair", action="append", help="LAYER/TRANSFORM: compare only these pairs (repeatable)")
    parser.add_argument("--maps", type=Path, help="file to keep the captured maps in (read if it exists)")
    parser.add_argument("--json", type=Path, help="write every pair's numbers here")
    opts = parser.parse_args()
    kinds = tuple(opts.kind or warpsearch.SEARCH_KINDS)
    if opts.maps is not None and opts.maps.is_file():
        items = torch.load(opts.maps, weights_only=False)
    else:
        items = capture_maps(opts.model, opts.max_images, opts.transform, opts.layers)
        if opts.maps is not None:
            torch.save(items, opts.maps)
    if opts.pair:
        items = [item for item in items if f"{item['layer']}/{item['transform']}" in set(opts.pair)]
        if not items:
            sys.exit(f"none of {', '.join(opts.pair)} was captured")
    baseline = load_baseline(opts.baseline)
    fit_pair(warpsearch, items[0], 2, kinds)  # warm-up of both code paths
    fit_pair(baseline, items[0], 2, kinds)
    rows, totals = [], {"baseline": 0.0, "new": 0.0}
    per_layer: dict[str, dict[str, float]] = {}
    for n, item in enumerate(items):
        order = [("baseline", baseline), ("new", warpsearch)]
        if n % 2:
            order.reverse()
        results, seconds = {}, {}
        for name, module in order:
            results[name], seconds[name] = fit_pair(module, item, opts.steps, kinds)
            totals[name] += seconds[name]
            per_layer.setdefault(item["layer"], {"baseline": 0.0, "new": 0.0})[name] += seconds[name]
        row = {"layer": item["layer"], "transform": item["transform"], "shape": list(item["reference"].shape),
               "baseline_s": round(seconds["baseline"], 4), "new_s": round(seconds["new"], 4)}
        for kind in kinds:
            old, new = results["baseline"][kind], results["new"][kind]
            analytic = warpsearch.analytic_matrix(parse_transform(item["transform"])[0], *item["mask"].shape, item["stride"])
            row[kind] = {"baseline_spec": old.spec, "new_spec": new.spec,
                         "displacement_cells": round(displacement_cells(old.matrix, new.matrix, item["mask"]), 4),
                         "analytic_loss": old.analytic_loss, "baseline_loss": old.loss, "new_loss": new.loss,
                         "baseline_plain_loss": old.plain_loss, "new_plain_loss": new.plain_loss,
                         "baseline_kept_inverse": bool(np.allclose(old.matrix, analytic, atol=1e-9)),
                         "new_kept_inverse": bool(np.allclose(new.matrix, analytic, atol=1e-9))}
        rows.append(row)
        print(f"{row['layer']:>10} {row['transform']:>14} {row['baseline_s']:7.2f}s {row['new_s']:6.2f}s  " + "  ".join(
            f"{k}: {row[k]['baseline_spec']} | {row[k]['new_spec']} d={row[k]['displacement_cells']:.3f} "
            f"loss {row[k]['baseline_loss']:.5g} | {row[k]['new_loss']:.5g}" for k in kinds), flush=True)
    summary = {"pairs": len(rows), "kinds": list(kinds), "steps": opts.steps, "baseline_seconds": round(totals["baseline"], 3),
               "new_seconds": round(totals["new"], 3), "speedup": round(totals["baseline"] / totals["new"], 2),
               "per_layer_speedup": {k: round(v["baseline"] / v["new"], 2) for k, v in per_layer.items()},
               "torch_threads": torch.get_num_threads()}
    for kind in kinds:
        fits = [r[kind] for r in rows]
        summary[kind] = {
            "max_displacement_cells": max(f["displacement_cells"] for f in fits),
            "same_kept_inverse": sum(f["baseline_kept_inverse"] == f["new_kept_inverse"] for f in fits),
            "max_loss_excess": max(f["new_loss"] - f["baseline_loss"] for f in fits),
            "max_relative_loss_excess": max((f["new_loss"] - f["baseline_loss"]) / f["analytic_loss"]
                                            for f in fits if f["analytic_loss"] > 0),
        }
    print(json.dumps(summary, indent=1))
    if opts.json is not None:
        opts.json.write_text(json.dumps({"summary": summary, "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
