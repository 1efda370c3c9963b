"""Set-up and analysis time of the whole analysis on one model per timm family, at native input size.

The same models, transforms and images as ``tests/test_zoo_native.py`` (random
weights, two bundled photos, default layers, rot90 and translate32,0): one
line per model with the time to build it, the time of alignscope's set-up
(probe, layouts, lattices), the analysis, the peak resident memory so far,
and how many default layers got a lattice. A benchmark, not a test: run it
before and after a change to see a slowdown.

Run:  python benchmarks/zoo_timing.py                       # every model
      python benchmarks/zoo_timing.py resnet18 swin_tiny_patch4_window7_224
      python benchmarks/zoo_timing.py --layers all mobilenetv3_small_100
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_models import TRANSFORMS, ZOO  # noqa: E402

import alignscope  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm names (default: every model of the zoo test)")
    parser.add_argument("--layers", default=None, help="a layer request, e.g. all (default: the model's stages)")
    args = parser.parse_args()
    logging.getLogger("alignscope").setLevel(logging.ERROR)
    print("| model | input | build s | set-up s | analysis s | peak RSS MiB | default layers | with lattice |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models or list(ZOO):
        started = time.perf_counter()
        model = timm.create_model(name, pretrained=False, **ZOO.get(name, {}).get("kwargs", {})).eval()
        built = time.perf_counter() - started
        size = model.pretrained_cfg["input_size"]
        report = alignscope.analyze(model, transforms=TRANSFORMS, max_images=2, batch_size=2, layers=args.layers,
                                    input_size=size, mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
        timings = report.meta["timings_seconds"]
        table = report.table[report.table["kind"] == "layer"] if "kind" in report.table else report.table
        rot = table[table["transform"] == "rot90"]
        lattices = int(rot["registered_error"].notna().sum()) if "registered_error" in rot else 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"| {name} | {size[-1]} | {built:.1f} | {timings['setup']:.1f} | {timings['analysis']:.1f} | {peak} | "
              f"{rot['layer'].nunique()} | {lattices} |", flush=True)


if __name__ == "__main__":
    main()
