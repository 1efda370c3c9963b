"""``alignscope explain``, ``bench`` and ``stn``: the commands beyond the core analysis.

They register on the group defined in :mod:`alignscope.cli.main`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from alignscope.cli.app import app
from alignscope.cli.options import fit_options, model_options, pair_options, run_options


@app.command()
@model_options(layers=False)
@click.option("--layer", default=None, help="One module name (see 'alignscope layers'). Default: the stage whose best channel permutation moves the largest share of channels.")
@pair_options(one_transform=True, seed=False, workers=False)
@click.option("--top", type=click.IntRange(min=1), default=4, show_default=True, help="Worst and best channels to draw and list.")
@click.option("--image", default=None, help="Image drawn in channels.png, by file name or stem. Default: the one with the most structure at the layer.")
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-explain", show_default=True, help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-channel table as JSON records.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def explain(options, layer, pairs, top, image, out, force, as_json, debug) -> None:
    """Show which channels of one layer carry the misalignment under one transform.

    Writes OUT/channels.csv (per channel: aligned_error, unaligned_error,
    share of the layer's misalignment, the channel the best permutation
    matches it with and the error after matching), OUT/explain.json and
    OUT/channels.png (a, b', a - b' and the matched channel for the worst
    and best channels of one image: --image, or the one with the most
    structure at the layer).

    \b
    Example:
      alignscope explain --layer blocks.2 --transform rot90 --top 3
    """
    from dataclasses import replace

    import alignscope.explain as explaining
    from alignscope.report.report import validate_destination, format_table

    out_path = validate_destination(out, force, inputs=tuple(pairs.images or ()))
    result = explaining.explain(model=replace(options, layers=layer), pairs=pairs, image=image)
    result.save(out_path, force=force, top=top)
    if as_json:
        click.echo(result.table.to_json(orient="records"))
        return
    meta = result.meta
    ranked = result.table.sort_values("aligned_error", ascending=False)
    columns = ("channel", "aligned_error", "unaligned_error", "share", "match", "match_correlation", "matched_error")
    click.echo(f"{meta['model']} {meta['layer']} {tuple(meta['shape'])} under {meta['transform']} · {len(meta['images_used'])} images")
    click.echo(f"layer {meta['layer']}: {meta['layer_reason']}")
    click.echo(f"layer aligned_error {meta['layer_aligned_error']:.3f} (mean over images, as in alignment.csv); pooled "
               f"over images {meta['layer_aligned_error_pooled']:.3f}, after the best channel permutation "
               f"{meta['layer_matched_error']:.3f} ({meta['channels_moved_by_permutation']} channels re-assigned; in-sample)")
    click.echo(f"\nworst {top} channels:")
    click.echo(format_table(ranked.head(top), columns))
    click.echo(f"\nbest {top} channels:")
    click.echo(format_table(ranked.tail(top)[::-1], columns))
    click.echo(f"\nchannels.png shows {Path(str(meta['example_image'])).name} ({meta['example_reason']})")
    click.echo(f"written to {out_path}/ (channels.csv, explain.json, channels.png)")


@app.command()
@model_options
@pair_options(images_default_help="Folder (recursive), file or glob; repeat to use the union. Default: distinct crops "
                                  "of the bundled photos.", max_images_default=64, mask=False, seed=False)
@run_options(outputs=False)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed passes after a warm-up.")
@click.option("--memory-scaling", is_flag=True, help="Also peak RSS of 'alignscope analyze' on 32 and 512 images, each in a fresh process.")
@click.option("--compare-malloc", is_flag=True,
              help="Also run this benchmark in two fresh processes, malloc tuned and not (ALIGNSCOPE_NO_MALLOC_TUNING=1).")
@fit_options(tuning=False, min_calibration=4)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def bench(options, pairs, run, fits, repeats, memory_scaling, compare_malloc, as_json, debug) -> None:
    """Time the analysis against the bare forward passes it needs (overhead ratio).

    (A) full-model forward passes over exactly the inputs the analysis feeds
    the model, (B) the analysis without plots or files; interleaved batch by
    batch (each batch's bare forwards, then its analysis) so both see the same
    load; a warm-up pass, then --repeats timed passes. Prints images/s, B/A as
    a ratio of sums with its spread over batches, where the time goes, peak
    RSS and the machine, and says when the run was too noisy to trust
    (repeats more than 20% apart, or a load average above the core count).

    \b
    Examples:
      alignscope bench
      alignscope bench --model resnet50 --no-pretrained --json
      alignscope bench --memory-scaling --compare-malloc
      alignscope bench --max-images 8 --optimal family --optimal affine --channel-map linear --channel-map permutation
    """
    import json

    import alignscope.bench.bench as benching

    transforms = [t.spec for t in pairs.transforms] if pairs.transforms is not None else None
    common = dict(model=options, transforms=transforms, batch_size=pairs.batch_size)
    timing = dict(images=pairs.images, max_images=pairs.max_images, amp=run.amp, channels_last=run.channels_last,
                  workers=pairs.workers, repeats=repeats)
    fitted = dict(optimal=list(fits.optimal), channel_map=list(fits.channel_map), calibration_images=fits.calibration_images)
    result = benching.benchmark(**common, **timing, **fitted)
    if memory_scaling:
        result["memory_scaling"] = benching.memory_scaling(**common)
    if compare_malloc:
        result["malloc_comparison"] = benching.malloc_comparison(**common, **timing)
    if as_json:
        click.echo(json.dumps(result))
        return
    for line in _bench_lines(result):
        click.echo(line)


def _bench_lines(result: dict) -> list[str]:
    """The text report of ``alignscope bench``."""
    m, noise, batch = result["machine"], result["noise"], result["batch_ratio"]
    loads = [v for v in noise["load_average"]["samples"] if v is not None]
    spread = noise["repeat_spread"]
    lines = [
        f"{result['model']} · {result['images']} images · batch {result['batch_size']} · {len(result['layers'])} layers · "
        f"{len(result['transforms'])} transforms · {m['device']} ({m.get('gpu', m['cpu'])}, {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']})",
        "load average:            " + (f"{loads[0]:.2f} at the start, at most {max(loads):.2f}" if loads else "not available"),
        f"interleaved batch by batch; {result['repeats']} timed passes after a warm-up "
        f"({result['forward_images_per_image']} forward images per image; output row "
        f"{'measured in B, full forwards' if result.get('output_row') else 'not measured: B stops after the deepest layer'})",
        f"bare forward passes (A): median {result['forward_seconds']:.2f} s, min {result['forward_seconds_min']:.2f} s",
        f"analysis (B):            median {result['analysis_seconds']:.2f} s, min {result['analysis_seconds_min']:.2f} s"
        f" = {result['images_per_second']:.2f} images/s",
        f"overhead ratio B/A:      {result['overhead_ratio']:.3f}   (sum of B / sum of A; per batch: min {batch['min']:.3f}, "
        f"median {batch['median']:.3f}, max {batch['max']:.3f} over {batch['batches']} batches)",
    ]
    if any(v is not None for v in spread.values()):
        lines.append("spread between repeats:  " + ", ".join(
            f"{name} {spread[key]:.1%}" for key, name in (("forward", "A"), ("analysis", "B"), ("ratio", "B/A")))
            + f"   (noisy above {noise['spread_limit']:.0%})")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in result["phase_share"].items())
    lines.append(f"time in the analysis:    {shares}")
    if "fit_seconds" in result:
        per_repeat = result["fit_ratio_per_repeat"]
        lines.append(f"fits (C):                {result['fit_seconds']:.2f} s  = {result['fit_ratio']:.3f} x B "
                     f"(calibration pass and {', '.join(v for vs in result['fits'].values() if isinstance(vs, list) for v in vs)}; "
                     f"C/B per repeat {min(per_repeat):.2f}-{max(per_repeat):.2f})")
        lines.append("  medians of its parts:  " + ", ".join(
            f"{name.replace('_', ' ')} {seconds:.2f} s" for name, seconds in result["fit_phase_seconds"].items()))
    lines.append(f"peak RSS:                {result['peak_rss_mb']:.0f} MiB ({result['peak_rss_of']})")
    if "memory_scaling" in result:
        scaling = result["memory_scaling"]
        for count, run in scaling["runs"].items():
            lines.append(f"peak RSS, {count:>4} images:  {run['peak_rss_mb']:.0f} MiB ('alignscope analyze' in a fresh process, "
                         f"{run['seconds']:.1f} s)")
        lines.append(f"ratio:                   {scaling['rss_ratio']:.3f}   (launcher floor {scaling['launcher_mb']} MiB)")
        bare = scaling["bare_forward"]
        lines.append(f"bare forward passes:     {bare['peak_rss_mb']:.0f} MiB (the model alone on {bare['images']} images "
                     "in a fresh process: the floor)")
    if "malloc_comparison" in result:
        comparison = result["malloc_comparison"]
        for name in comparison["order"]:
            run = comparison["runs"][name]
            lines.append(f"malloc {name + ':':<17}A {run['forward_seconds']:.2f} s, B {run['analysis_seconds']:.2f} s, "
                         f"B/A {run['overhead_ratio']:.3f}, peak RSS {run['peak_rss_mb']:.0f} MiB"
                         + ("  [noisy]" if run["noisy"] else ""))
        lines.append(f"untuned / tuned time:    A {comparison['forward_speedup']:.3f}, B {comparison['analysis_speedup']:.3f}")
    if noise["unchecked"]:
        lines.append("not checked:             " + "; ".join(noise["unchecked"]))
    noisy = noise["reasons"] + (["a malloc comparison run was noisy"] if result.get("malloc_comparison", {}).get("noisy") else [])
    if noisy:
        lines.append("NOISY RUN, do not quote these figures: " + "; ".join(noisy)
                     + ". Re-run on a quiet machine.")
    return lines


@app.command()
@click.option("--data", default="digits", show_default=True,
              help="digits (scikit-learn's, offline), mnist:DIR (the four MNIST IDX files in DIR) or folder:DIR "
                   "(one sub-folder per class).")
@click.option("--images", default=None, help="Same as --data folder:DIR.")
@click.option("--task", type=click.Choice(["rotate", "scale"]), default="rotate", show_default=True,
              help="rotate: a fresh random angle in [-90, 90] degrees per sample; scale: a zoom in [0.5, 1].")
@click.option("--classifier", type=click.Choice(["small", "narrow", "classic"]), default="narrow", show_default=True,
              help="small: 4 conv-ReLU-BN blocks of 16-32 channels; narrow: the same with 4-8; classic: conv9x64, "
                   "conv7x64 (see docs/stn-experiments.md).")
@click.option("--variants", default="default", show_default=True,
              help="Comma-separated: none, input, iterative (the input STN applied twice), features@k, shared@k, "
                   "deep@k, supervised (a control: input's "
                   "localization net alone, trained on the true transform at --lr without the ramp: the most a net of "
                   "that size undoes; no accuracy and no layer alignment, its classifier is never trained); ranges "
                   "such as deep@1..4; 'default' (none, input, features@1, features@2, shared@2, deep@2; classic: k=1 "
                   "only), 'depth-sweep' or 'all'.")
@click.option("--depth-sweep", is_flag=True,
              help="Same as --variants depth-sweep: none, input, then shared@k and deep@k for k = 1 to the classifier's "
                   "depth (4 for small and narrow), with stability columns and a figure against k.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--recipe", type=click.Choice(["digits", "paper"]), default="digits", show_default=True,
              help="digits: the recipe that brought the input STN closest to undoing rotation on the offline digits "
                   "in the CPU budget; "
                   "paper: the papers' SGD recipe (see docs/stn-experiments.md). The options below override single fields.")
@click.option("--optimizer", type=click.Choice(["sgd", "momentum", "adam"]), default=None, help="Default: from --recipe.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Default: from --recipe.")
@click.option("--loc-lr-multiplier", type=click.FloatRange(min=0), default=None,
              help="Learning rate of the localization-only parameters, relative to --lr. Default: from --recipe.")
@click.option("--loc-weight-decay", type=click.FloatRange(min=0), default=None,
              help="L2 weight decay on the localization-only parameters. Default: from --recipe.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training steps per run. Default: from --recipe.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: from --recipe.")
@click.option("--schedule", type=click.Choice(["step", "cosine", "constant"]), default=None,
              help="Learning-rate schedule: step (x0.1 at 1/2 and 3/4), cosine (to zero) or constant. Default: from --recipe.")
@click.option("--ramp", type=click.FloatRange(0, 1), default=None,
              help="Curriculum: the transforms grow from none to their full range over this fraction of the iterations. "
                   "Default: from --recipe.")
@click.option("--test-passes", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random transforms of the test set to average over.")
@click.option("--warp", type=click.Choice(["affine", "rotation", "rotation_scale"]), default="affine", show_default=True)
@click.option("--quick", is_flag=True, help="1 seed, 150 steps of 64, 2 test passes, none/input/features@1/shared@1/deep@1 "
                                          "(with --depth-sweep: its variants, 3 seeds): checks the set-up, learns little.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs trained at once, each in its own process with one torch thread (2 on a 2-core machine).")
@click.option("--combine", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Train nothing: combine these saved runs (one recipe, e.g. one variant each) into one comparison "
                   "in --out. Repeatable.")
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-stn", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON records.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def stn(data, images, task, classifier, variants, seeds, recipe, optimizer, lr, loc_lr_multiplier, loc_weight_decay,
        iterations, batch_size, schedule, ramp, test_passes, warp, depth_sweep, quick, jobs, combine, out, force, as_json,
        debug) -> None:
    """Where should the spatial transformer go? Train STN variants on transformed digits and compare.

    Every training sample gets a fresh random transform in every epoch; the
    test set is --test-passes fixed random transforms of each test image.
    Writes OUT/stn_results.csv (per variant and seed: parameters, test
    accuracy, angle_std_deg and deming_slope of the learned warps, seconds),
    stn_alignment.csv (maps of the transformed digit against the upright
    one's at the STN output and after each layer, relative to chance),
    stn_angles.csv, stn_summary.csv and plots (accuracy, predicted against
    true angle, learned warps) and stn_models.pt (seed-0 weights per
    variant). --combine merges saved runs into one comparison.

    \b
    Examples:
      alignscope stn --quick
      alignscope stn --data mnist:DIR --depth-sweep --iterations 10000 --jobs 2
      alignscope stn --variants none,input,shared@1..4,deep@1..4 --seeds 3
      alignscope stn --variants none,input --seeds 3
      alignscope stn --variants input --out stn-input; alignscope stn --variants none --out stn-none
      alignscope stn --combine stn-none --combine stn-input --out stn-all
      alignscope stn --recipe paper --data mnist:~/mnist --classifier classic --iterations 150000
    """
    from alignscope.errors import UsageError
    from alignscope.report.report import validate_destination
    from alignscope.stn import run_experiment
    from alignscope.stn.models import expand_variants
    from alignscope.stn.train import recipe as make_recipe
    from alignscope.stn.experiment import QUICK
    from alignscope.stn.saved import combine_experiments, load_experiment

    if combine:
        out_path = validate_destination(out, force, inputs=combine)
        parts = [load_experiment(folder) for folder in combine]
        experiment = combine_experiments(parts)
        if experiment.test is None:
            for folder, part in zip(combine, parts):
                if part.settings.get("test_set_missing"):
                    click.echo(f"note: {folder}: {part.settings['test_set_missing']}; stn_warps.png is left out", err=True)
        experiment.save(out_path, force=force)
        _print_stn_summary(experiment, out_path, as_json)
        return
    if images and data != "digits":
        raise UsageError("give either --data or --images, not both")
    data = f"folder:{images}" if images else data
    if depth_sweep:
        if variants != "default":
            raise UsageError("give either --depth-sweep or --variants, not both")
        variants = "depth-sweep"
    if quick:
        seeds, test_passes = (QUICK["sweep_seeds"] if variants == "depth-sweep" else QUICK["seeds"]), QUICK["test_passes"]
        iterations, batch_size = iterations or QUICK["iterations"], batch_size or QUICK["batch_size"]
        variants = ",".join(QUICK["variants"]) if variants == "default" else variants
    chosen = expand_variants(variants, classifier)
    config = make_recipe(recipe, optimizer=optimizer, lr=lr, loc_lr_multiplier=loc_lr_multiplier,
                         loc_weight_decay=loc_weight_decay, iterations=iterations, batch_size=batch_size,
                         schedule=schedule, ramp=ramp)
    folder = data.partition(":")[2]
    out_path = validate_destination(out, force, inputs=[folder] if folder else ())
    bar = None if as_json else click.progressbar(length=len(chosen) * seeds * config.iterations, label="training",
                                                  file=sys.stderr, show_eta=True, show_percent=True)

    shown = []  # the bar appears with the first step, so an error while reading the data prints nothing before it

    def progress(done: int, total: int) -> None:
        if not shown:
            bar.__enter__()
            shown.append(True)
        bar.update(done - bar.pos)

    def log(line: str) -> None:
        if bar is not None:
            # on a terminal, below the bar (which redraws on its next update); in a log file, one line each
            click.echo(("\n" if sys.stderr.isatty() else "") + line, err=True)

    try:
        experiment = run_experiment(data, task, chosen, seeds, config, classifier, warp, test_passes,
                                    progress=None if bar is None else progress, log=log, jobs=jobs)
    finally:
        if shown:
            bar.__exit__(None, None, None)
    experiment.save(out_path, force=force)
    _print_stn_summary(experiment, out_path, as_json)
    if variants == "depth-sweep" and experiment.depth_answer() is None and not as_json:
        click.echo(f"(the {classifier} classifier allows one depth only, k = 1: no depth figure and no comparison "
                   "across depths)")


def _print_stn_summary(experiment, out_path, as_json: bool) -> None:
    summary = experiment.summary()
    if as_json:
        click.echo(summary.to_json(orient="records"))
        return
    from alignscope.report.report import format_table

    table = summary.drop(columns=["seeds"])
    if (summary["seeds"] <= 1).all():  # one seed: a spread would be NaN, not a number
        table = table.drop(columns=[c for c in table.columns if c.endswith("_std")])
    short = {"parameters": "params", "localization_parameters": "loc_params", "test_accuracy_mean": "accuracy",
             "test_accuracy_std": "acc_std", "angle_std_deg_mean": "angle_std", "angle_std_deg_std": "angle_std_sd",
             "deming_slope_mean": "slope", "deming_slope_std": "slope_sd", "alignment_at_stn": "align_stn",
             "alignment_last_layer": "align_last", "diverged_fraction": "diverged", "collapsed_fraction": "collapsed",
             "worst_seed": "worst", "angle_std_deg_worst": "angle_worst", "test_accuracy_worst": "acc_worst"}
    table = table.rename(columns=short)
    click.echo(format_table(table, tuple(table.columns)))
    click.echo("")
    click.echo(experiment.answer())
    depth = experiment.depth_answer()
    if depth:
        click.echo(depth)
    click.echo("(columns as in stn_summary.csv, shortened: accuracy = test_accuracy_mean, angle_std = the warp's angle "
               "error std in degrees, align_stn / align_last = alignment error at the STN / the last layer; diverged / collapsed: shares of the seeds, "
               "worst: the seed with the largest angle_std, see docs/stn-experiments.md)")
    click.echo(f"\nwritten to {out_path}/ (stn_results.csv, stn_alignment.csv, stn_angles.csv, stn_curves.csv, stn_summary.csv, "
               "plots)")
