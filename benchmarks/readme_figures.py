"""Measure every figure of docs/performance.md, on a quiet machine, in one go.

Run:  python benchmarks/readme_figures.py --out bench-results

Each measurement is the page's own command line, run in a fresh process:

    alignscope bench --max-images 64 --json                                  (lite0)
    alignscope bench --model resnet50 --no-pretrained --max-images 64 --json
    alignscope bench --memory-scaling --repeats 1 --max-images 16 --json     (memory: 32 and 512 images)
    alignscope bench --compare-malloc --repeats 3 --max-images 64 --json     (malloc tuned / untuned)

The JSON of each lands in OUT/, and the rows for its tables are
printed, with the machine and its load. A run flagged noisy is printed as
such and makes the exit status 1: its figures are not to be quoted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNS = {
    "lite0": ["--max-images", "64"],
    "resnet50": ["--model", "resnet50", "--no-pretrained", "--max-images", "64"],
    "memory": ["--memory-scaling", "--repeats", "1", "--max-images", "16"],
    "malloc": ["--compare-malloc", "--max-images", "64"],
}


def bench(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "alignscope", "bench", *arguments, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"alignscope bench {' '.join(arguments)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead_row(result: dict) -> str:
    shares = " / ".join(f"{result['phase_share'].get(k, 0.0):.1%}" for k in ("forward", "warping", "metrics", "loading"))
    spread = {k: "n/a" if v is None else f"{v:.0%}" for k, v in result["noise"]["repeat_spread"].items()}
    batch = result["batch_ratio"]
    weights = "ImageNet weights" if result["pretrained"] else "random weights"
    return (f"| {result['model']} ({weights}) | {result['forward_seconds_min']:.1f} / {result['forward_seconds']:.1f} | "
            f"{result['analysis_seconds_min']:.1f} / {result['analysis_seconds']:.1f} | {result['overhead_ratio']:.3f} | "
            f"{batch['min']:.2f}–{batch['max']:.2f} | {spread['forward']} / {spread['analysis']} | "
            f"{result['images_per_second']:.2f} | {shares} | {result['peak_rss_mb']:.0f} MiB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these measurements")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    noisy = []
    results = {}
    for name in options.only or RUNS:
        print(f"measuring {name}: alignscope bench {' '.join(RUNS[name])} --json", file=sys.stderr, flush=True)
        results[name] = bench(RUNS[name])
        (options.out / f"{name}.json").write_text(json.dumps(results[name], indent=2), encoding="utf-8")
        # memory does not depend on the load; the timings of every other run do
        if name != "memory" and (results[name]["noisy"] or results[name].get("malloc_comparison", {}).get("noisy")):
            noisy.append(name)
    first = next(iter(results.values()))
    m = first["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"python {m['python']}, {m['device']}")
    for name, result in results.items():
        loads = [v for v in result["noise"]["load_average"]["samples"] if v is not None]
        load = f"load average {loads[0]:.2f} at the start, at most {max(loads):.2f}" if loads else "no load average"
        print(f"{name}: {load}; {'NOISY: ' + '; '.join(result['noise']['reasons']) if result['noisy'] else 'not noisy'}")
    overhead = [results[k] for k in ("lite0", "resnet50") if k in results]
    if overhead:
        print("\n| model | A: bare forwards, min / median (s) | B: analysis, min / median (s) | overhead B/A (sum of B / sum of A) "
              "| B/A per batch | spread between repeats A / B | images/s | forward / warping / metrics / loading share of B "
              "| peak RSS of the benchmark |")
        print("|---|---|---|---|---|---|---|---|---|")
        for result in overhead:
            print(overhead_row(result))
        for result in overhead:
            print(f"{result['model']}: A passes {result['all_forward_seconds']} s, B passes {result['all_analysis_seconds']} s")
    if "memory" in results:
        scaling = results["memory"]["memory_scaling"]
        runs = scaling["runs"]
        print("\nmemory: " + ", ".join(f"{count} images {run['peak_rss_mb']:.0f} MiB" for count, run in runs.items())
              + f", ratio {scaling['rss_ratio']:.3f} (launcher floor {scaling['launcher_mb']} MiB)"
              + (f"; bare forward passes {scaling['bare_forward']['peak_rss_mb']:.0f} MiB on "
                 f"{scaling['bare_forward']['images']} images" if "bare_forward" in scaling else ""))
    if "malloc" in results:
        comparison = results["malloc"]["malloc_comparison"]
        for name in comparison["order"]:
            run = comparison["runs"][name]
            print(f"malloc {name}: A {run['forward_seconds']:.2f} s, B {run['analysis_seconds']:.2f} s, "
                  f"peak RSS {run['peak_rss_mb']:.0f} MiB{' [noisy]' if run['noisy'] else ''}")
        print(f"untuned / tuned: A {comparison['forward_speedup']:.3f}, B {comparison['analysis_speedup']:.3f}")
    if noisy:
        sys.exit(f"noisy runs: {', '.join(noisy)}; do not quote their figures, re-run on a quiet machine")


if __name__ == "__main__":
    main()
