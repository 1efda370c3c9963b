"""Sweep timm families with random weights: how alignscope reads each one's layers, one line per model.

For every model it runs the default layers and ``--layers all`` (two bundled
photos, rot90 and translate32,0) and prints what was read and how: the
layouts of the default layers, dropped default stages, how many modules of
``all`` are maps and why the others are not, the median aligned / unaligned
error of rot90 and translate32,0 at the default layers, and whether the
chance distance collapsed, and how many default layers have a measured
lattice. Every model runs at its native input size (timm's
``pretrained_cfg``), the size users run it at; the sweep measures reading,
not speed (``benchmarks/zoo_timing.py`` times the default runs).

Run:  python benchmarks/sweep_layouts.py                 # the whole list, a markdown table
      python benchmarks/sweep_layouts.py resnet18 vit_tiny_patch16_224
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import timm
import torch

import alignscope

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_models import ZOO  # noqa: E402  (one model per family, as the zoo test runs them)

TRANSFORMS = ["rot90", "translate32,0"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(model: torch.nn.Module, size: int, mean, std, layers):
    handler = _Collect()
    logger = logging.getLogger("alignscope")
    logger.addHandler(handler)
    try:
        report = alignscope.analyze(model, transforms=TRANSFORMS, layers=layers, max_images=2, batch_size=2,
                                    input_size=(3, size, size), mean=mean, std=std)
    finally:
        logger.removeHandler(handler)
    return report, handler.messages


def _reason_kind(reason: str) -> str:
    labels = {"window-partitioned": "window-partitioned", "attention": "attention", "not a tensor": "not a tensor",
              "no spatial extent": "no spatial extent", "-D": "not 3/4-D", "aspect ratio": "no grid", "token grid": "no grid",
              "times in one forward": "shared module", "no module of this name": "missing stage",
              "same output tensor": "same output tensor", "capped": "capped"}
    return next((label for key, label in labels.items() if key in reason), "other")


def sweep_one(name: str) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg
    size = int(cfg["input_size"][-1])
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    default, warnings = _run(model, size, mean, std, None)
    table = default.table[default.table["kind"] == "layer"]
    layouts = collections.Counter(v["layout"].split(" ")[0] for v in default.meta["layer_layouts"].values())
    rows = {t: table[table["transform"] == t] for t in TRANSFORMS}
    everything, _ = _run(model, size, mean, std, "all")
    skipped = collections.Counter(_reason_kind(item["reason"]) for item in everything.meta["layers_skipped"])
    strides = sorted({float(s) for s in table["stride"]})
    return {
        "model": name,
        "input": size,
        "default": f"{len(default.meta['layers'])} ({', '.join(f'{k} {v}' for k, v in sorted(layouts.items()))})",
        "dropped": len(default.meta["layers_skipped"]),
        "all": len(everything.meta["layers"]),
        "all skipped": ", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "-",
        "strides": "fractional" if any(s != round(s) for s in strides) else "integer",
        "rot90 al/un": f"{rows['rot90']['aligned_error'].median():.2f}/{rows['rot90']['unaligned_error'].median():.2f}",
        "shift al/un": f"{rows['translate32,0']['aligned_error'].median():.2f}/{rows['translate32,0']['unaligned_error'].median():.2f}",
        "collapse": "yes" if any("chance distance collapsed" in m for m in warnings) else "no",
        "lattice": f"{int(rows['rot90']['registered_error'].notna().sum())}/{len(rows['rot90'])}",
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm names (default: the built-in list)")
    args = parser.parse_args(argv)
    names = args.models or list(ZOO)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    columns = ["model", "input", "default", "dropped", "all", "all skipped", "strides", "rot90 al/un", "shift al/un", "collapse", "lattice"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    failures = 0
    for name in names:
        try:
            row = sweep_one(name)
        except Exception as exc:  # one line per model, also for a failure
            failures += 1
            first = (str(exc).splitlines() or [""])[0][:100]
            row = {"model": name, "default": f"ERROR {type(exc).__name__}: {first}"}
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |", flush=True)
        print(f"{name}: {row.get('seconds', '-')} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
