"""``alignscope`` command line: analyze, layers, models, plot, compare.

Errors the library raises on purpose print as one line and exit 2 (usage)
or 1 (runtime); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import click

from alignscope._version import __version__
from alignscope.errors import AlignscopeError

EPILOG_ANALYZE = """\b
Examples:
  alignscope analyze                                   # offline default: EfficientNet-Lite0, bundled photos
  alignscope analyze --transform rot90 --transform translate32,0
  alignscope analyze --model resnet50 --weights resnet50.safetensors --transform rotate30
  alignscope analyze --transform rotate:-90:90:15 --layers 'blocks.*' --images photos/ --max-images 64
  alignscope analyze --json --no-plots --out run1 > table.json
  alignscope analyze --transform rot90 --optimal family --channel-map permutation --channel-map linear
"""

TRANSFORM_HELP = (
    "Transform spec, repeatable: rotate30, scale0.8, translate16,-8, roll16,-8, shear15, hflip, vflip, "
    "rot90/180/270, identity; a+b composes (a first); rotate:-90:90:15 sweeps. Default: a set contrasting "
    "translations (alignable) with rotations, scalings and a flip."
)


class _OneLineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _setup_logging() -> None:
    logger = logging.getLogger("alignscope")
    if not any(isinstance(h, _OneLineHandler) for h in logger.handlers):
        logger.addHandler(_OneLineHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="alignscope")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def app(debug: bool) -> None:
    """Can a spatial warp align a CNN's feature maps of a transformed image with the original's?

    alignscope feeds image / transformed-image pairs through a model, un-warps
    the intermediate feature maps of the transformed image with the inverse
    transform, and reports per layer how far they stay from the original's,
    against controls: unaligned, chance (another image) and the floor
    (resampling the image alone).
    """
    _setup_logging()


def _progress(enabled: bool):
    """A progress callback drawing a bar on stderr, or None."""
    if not enabled:
        return None, None
    bar = click.progressbar(length=1, label="analyzing", file=sys.stderr, show_pos=True, show_eta=True)
    state = {"started": False}

    def update(done: int, total: int) -> None:
        if not state["started"]:
            bar.length = total
            bar.__enter__()
            state["started"] = True
        bar.update(done - bar.pos)

    def finish() -> None:
        if state["started"]:
            bar.__exit__(None, None, None)

    return update, finish


def model_options(command):
    """--model, --weights and --no-pretrained, shared by the commands that load a model."""
    command = click.option("--no-pretrained", is_flag=True, help="Random initialisation (reports say so).")(command)
    command = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                           help="Local checkpoint (.pth/.pt/.safetensors) for the model.")(command)
    return click.option("--model", default="tf_efficientnet_lite0", show_default=True, help="timm model name.")(command)


FITTED_COLUMNS = ("optimal_error", "optimal_affine_error", "channel_mapped_error", "permuted_error")


def _parse_ridge(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise click.BadParameter(f"{text!r} is neither 'auto' nor a number >= 0", param_hint="--ridge")
    return value


@app.command(epilog=EPILOG_ANALYZE)
@model_options
@click.option("--layers", multiple=True, help="Module names, globs ('blocks.*') or 'all'. Default: the model's stages.")
@click.option("--transform", "transforms", multiple=True, help=TRANSFORM_HELP)
@click.option("--images", default=None, help="Folder (recursive), file or glob. Default: the bundled photos.")
@click.option("--max-images", type=click.IntRange(min=2), default=None, help="Use at most N images (seeded sample, sorted).")
@click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--mask", type=click.Choice(["auto", "disk", "none"]), default="auto", show_default=True,
              help="disk: keep the centred disk of each image and compare only inside it; auto: disk for rotations and shears.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
              help="Run the model under autocast; maps are compared in float32, statistics kept in float64.")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC tensors for the model (default: on for CUDA).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes decoding images (pinned memory on CUDA).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for image sampling.")
@click.option("--optimal", multiple=True, type=click.Choice(["family", "affine"]),
              help="Also search the best spatial warp: 'family' frees g's own parameters plus a shift (optimal_error), "
                   "'affine' all six affine entries (optimal_affine_error). Cost: about 130 gradient evaluations over the "
                   "calibration maps per layer and transform (seconds each on a CPU for large maps).")
@click.option("--channel-map", "channel_map", multiple=True, type=click.Choice(["linear", "permutation"]),
              help="Also re-mix channels after the inverse warp: 'linear' a ridge least-squares C x C map "
                   "(channel_mapped_error), 'permutation' the best channel relabelling (permuted_error). Cost: C x C "
                   "statistics per layer and transform, one C^3 solve (linear) or assignment (permutation).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None,
              help="Images the fits are calibrated on (default: half, at most 16); all columns are then measured on the rest.")
@click.option("--ridge", default="auto", show_default=True, help="Ridge of the linear channel map, or 'auto' (two-fold cross-validation).")
@click.option("--search-steps", type=click.IntRange(min=0), default=60, show_default=True, help="Gradient steps per start of the warp search.")
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-report", show_default=True, help="Report folder.")
@click.option("--force", is_flag=True, help="Overwrite an existing report folder.")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots.")
@click.option("--per-image", is_flag=True, help="Also write per_image.csv with one row per image.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON records on stdout instead of text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def analyze(model, weights, no_pretrained, layers, transforms, images, max_images, batch_size, mask, device, amp,
            channels_last, workers, seed,
            optimal, channel_map, calibration_images, ridge, search_steps, out, force, no_plots, per_image, as_json, quiet,
            debug) -> None:
    """Measure per layer how well the inverse warp aligns feature maps.

    Writes OUT/alignment.csv, OUT/run.json and plots, prints a compact table
    and one verdict per transform.
    """
    import alignscope
    from alignscope.report import SUMMARY_COLUMNS, check_destination, format_table

    from alignscope.distributed import launched_world_size

    ridge_value = _parse_ridge(ridge)
    out_path = check_destination(out, force)  # before the work, not after it
    main_rank = os.environ.get("RANK", "0") == "0" or launched_world_size() <= 1
    update, finish = _progress(not quiet and main_rank and sys.stderr.isatty())
    try:
        report = alignscope.analyze(
            model=model,
            transforms=list(transforms) or None,
            images=images,
            layers=list(layers) or None,
            batch_size=batch_size,
            mask=mask,
            device=device,
            seed=seed,
            per_image=per_image,
            max_images=max_images,
            weights=weights or "auto",
            pretrained=not no_pretrained,
            optimal=list(optimal) or None,
            channel_map=list(channel_map) or None,
            ridge=ridge_value,
            search_steps=search_steps,
            calibration_images=calibration_images,
            amp=amp,
            channels_last=channels_last,
            workers=workers,
            progress=update,
        )
    finally:
        if finish:
            finish()
    if report.meta.get("rank", 0) != 0:
        return  # under torchrun only rank 0 writes and prints
    report.save(out_path, force=force, plots=not no_plots)
    if as_json:
        click.echo(report.table.to_json(orient="records"))
        return
    if quiet:
        return
    meta = report.meta
    weights_note = "" if meta.get("pretrained", True) else "  [RANDOM WEIGHTS: not pretrained]"
    split = ""
    if "fits" in meta:
        split = f" held out ({len(meta['fits']['calibration_images'])} more calibrated the fits)"
    click.echo(f"{meta['model']} · {len(meta['images_used'])} images{split} · weights: {meta['weights']}{weights_note}")
    fitted = tuple(c for c in FITTED_COLUMNS if c in report.table.columns)
    columns = SUMMARY_COLUMNS[:4] + fitted + SUMMARY_COLUMNS[4:] if fitted else SUMMARY_COLUMNS
    click.echo(format_table(report.table, columns))
    click.echo("")
    for line in report.verdicts():
        click.echo(line)
    click.echo(f"\nreport written to {out_path}/")


@app.command()
@click.argument("model", default="tf_efficientnet_lite0")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Also list modules without spatial output and duplicates.")
def layers(model: str, fmt: str, show_all: bool) -> None:
    """List MODEL's modules: output C x H x W, stride, default stage (no weights needed).

    \b
    Examples:
      alignscope layers tf_efficientnet_lite0
      alignscope layers resnet50 --format csv > layers.csv
    """
    import pandas as pd

    from alignscope.hooks import probe_layers
    from alignscope.models import load_model

    net, cfg = load_model(model, pretrained=False)
    probed = probe_layers(net, cfg.input_size)
    rows = []
    for index, layer in enumerate(probed):
        if not show_all and (not layer.spatial or layer.reason):
            continue
        rows.append({
            "index": index,
            "name": layer.name,
            "module": layer.module_type,
            "output": "x".join(map(str, layer.shape)) if layer.shape else "",
            "stride": layer.stride if layer.stride is not None else "",
            "default": layer.default,
            "note": layer.reason,
        })
    table = pd.DataFrame(rows)
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(table.to_json(orient="records"))
    else:
        click.echo(f"{model}: input {'x'.join(map(str, cfg.input_size))}, {len(table)} modules listed "
                   f"(stride = input height / output height; default = stages from timm feature_info)")
        click.echo(table.drop(columns=[] if show_all else ["note"]).to_string(index=False))


@app.command()
def models() -> None:
    """List models whose pretrained weights are available offline on this machine."""
    from alignscope.models import offline_model_table

    rows = offline_model_table()
    click.echo("Pretrained weights available offline now:")
    for row in rows:
        click.echo(f"  {row['model']:<28} {row['weights']}")
    if not rows:
        click.echo("  (none)")
    click.echo(
        "\nEvery timm CNN works: with internet, timm fetches its pretrained weights from the hub; offline, pass a\n"
        "local checkpoint with --weights FILE, or --no-pretrained for random weights."
    )


@app.command()
@click.argument("csv", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for the PNGs (default: the CSV's folder).")
@click.option("--force", is_flag=True, help="Overwrite existing PNGs.")
def plot(csv: str, out: str | None, force: bool) -> None:
    """Redraw the plots of a report from its alignment.csv."""
    from alignscope.errors import ReportExistsError
    from alignscope.plots import report_figures, save_figures
    from alignscope.report import read_report_csv

    table = read_report_csv(csv)
    folder = Path(out) if out else Path(csv).parent
    figures = report_figures(table)
    clashes = [folder / f"{stem}.png" for stem in figures if (folder / f"{stem}.png").exists()]
    if clashes and not force:
        raise ReportExistsError(f"{clashes[0]} exists; pass --force to overwrite plots or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    for path in save_figures(figures, folder):
        click.echo(str(path))


@app.command()
@click.argument("csvs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-compare", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing comparison folder.")
def compare(csvs: tuple[str, ...], out: str, force: bool) -> None:
    """Overlay several reports (models or runs) in one figure and one table.

    \b
    Example:
      alignscope compare lite0/alignment.csv resnet50/alignment.csv --out cmp
    """
    import pandas as pd

    from alignscope.plots import depth_figure, save_figures
    from alignscope.report import publish_folder, read_report_csv

    tables = []
    for index, path in enumerate(csvs):
        table = read_report_csv(path)
        if len(csvs) > 1 and table["model"].nunique() == 1 and any(t["model"].iloc[0] == table["model"].iloc[0] for t in tables):
            table["model"] = f"{table['model'].iloc[0]} ({Path(path).parent.name or index})"
        tables.append(table)
    combined = pd.concat(tables, ignore_index=True)

    def write(folder: Path) -> None:
        combined.to_csv(folder / "comparison.csv", index=False)
        save_figures({"comparison_by_depth": depth_figure(combined)}, folder)

    publish_folder(Path(out), write, force)
    wide = combined.pivot_table(index=["transform", "depth"], columns="model", values="aligned_error", sort=False)
    click.echo("aligned_error by transform and depth:")
    click.echo(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    click.echo(f"\ncomparison written to {out}/")


@app.command()
@model_options
@click.option("--layer", default=None, help="One module name (see 'alignscope layers'). Default: the deepest stage.")
@click.option("--transform", default="rot90", show_default=True, help="One transform spec (see 'alignscope analyze --help').")
@click.option("--images", default=None, help="Folder (recursive), file or glob. Default: the bundled photos.")
@click.option("--max-images", type=click.IntRange(min=2), default=None, help="Use at most N images.")
@click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--mask", type=click.Choice(["auto", "disk", "none"]), default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--top", type=click.IntRange(min=1), default=4, show_default=True, help="Worst and best channels to draw and list.")
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-explain", show_default=True, help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-channel table as JSON records.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def explain(model, weights, no_pretrained, layer, transform, images, max_images, batch_size, mask, device, top, out, force,
            as_json, debug) -> None:
    """Show which channels of one layer carry the misalignment under one transform.

    Writes OUT/channels.csv (per channel: aligned_error, unaligned_error,
    share of the layer's misalignment, the channel the best permutation
    matches it with and the error after matching), OUT/explain.json and
    OUT/channels.png (a, b', a - b' and the matched channel for the worst
    and best channels of the first image).

    \b
    Example:
      alignscope explain --layer blocks.2 --transform rot90 --top 3
    """
    import alignscope.explain as explaining
    from alignscope.report import check_destination, format_table

    out_path = check_destination(out, force)
    result = explaining.explain(model=model, layer=layer, transform=transform, images=images, batch_size=batch_size,
                                mask=mask, device=device, max_images=max_images, weights=weights or "auto",
                                pretrained=not no_pretrained)
    result.save(out_path, force=force, top=top)
    if as_json:
        click.echo(result.table.to_json(orient="records"))
        return
    meta = result.meta
    ranked = result.table.sort_values("aligned_error", ascending=False)
    columns = ("channel", "aligned_error", "unaligned_error", "share", "match", "match_correlation", "matched_error")
    click.echo(f"{meta['model']} {meta['layer']} {tuple(meta['shape'])} under {meta['transform']} · {len(meta['images_used'])} images")
    click.echo(f"layer aligned_error {meta['layer_aligned_error']:.3f}; after the best channel permutation "
               f"{meta['layer_matched_error']:.3f} ({meta['channels_moved_by_permutation']} channels re-assigned; in-sample)")
    click.echo(f"\nworst {top} channels:")
    click.echo(format_table(ranked.head(top), columns))
    click.echo(f"\nbest {top} channels:")
    click.echo(format_table(ranked.tail(top)[::-1], columns))
    click.echo(f"\nwritten to {out_path}/ (channels.csv, channels.png)")


@app.command()
@model_options
@click.option("--layers", multiple=True, help="Module names or globs. Default: the model's stages.")
@click.option("--transform", "transforms", multiple=True, help="Transform spec, repeatable. Default: the default set.")
@click.option("--images", default=None, help="Folder, file or glob. Default: distinct crops of the bundled photos.")
@click.option("--max-images", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True)
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC tensors (default: on for CUDA).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed repeats (median) after a warm-up.")
@click.option("--memory-scaling", is_flag=True, help="Also peak RSS for 32 and 512 images, each in a fresh process.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def bench(model, weights, no_pretrained, layers, transforms, images, max_images, batch_size, device, amp, channels_last,
          workers, repeats, memory_scaling, as_json, debug) -> None:
    """Time the analysis against the bare forward passes it needs (overhead ratio).

    (A) full-model forward passes over exactly the inputs the analysis feeds
    the model, (B) the analysis without plots or files; interleaved, median
    of --repeats after a warm-up. Prints images/s, B/A, where the time goes,
    peak RSS and the machine.

    \b
    Examples:
      alignscope bench
      alignscope bench --model resnet50 --no-pretrained --json
      alignscope bench --memory-scaling --batch-size 16
    """
    import json

    from alignscope.bench import benchmark
    from alignscope.bench import memory_scaling as scaling

    result = benchmark(model=model, weights=weights or "auto", pretrained=not no_pretrained, images=images,
                       max_images=max_images, transforms=list(transforms) or None, layers=list(layers) or None,
                       batch_size=batch_size, device=device, amp=amp, channels_last=channels_last, workers=workers,
                       repeats=repeats)
    if memory_scaling:
        result["memory_scaling"] = scaling(model=model, weights=weights or "auto", pretrained=not no_pretrained,
                                           transforms=list(transforms) or None, layers=list(layers) or None,
                                           batch_size=batch_size, device=device)
    if as_json:
        click.echo(json.dumps(result))
        return
    m = result["machine"]
    click.echo(f"{result['model']} · {result['images']} images · batch {result['batch_size']} · {len(result['layers'])} layers · "
               f"{len(result['transforms'])} transforms · {m['device']} ({m.get('gpu', m['cpu'])}, {m['cores']} cores, torch {m['torch']})")
    click.echo(f"bare forward passes (A): {result['forward_seconds']:.2f} s  ({result['forward_images_per_image']} forward images per image)")
    click.echo(f"analysis (B):            {result['analysis_seconds']:.2f} s  = {result['images_per_second']:.2f} images/s")
    click.echo(f"overhead ratio B/A:      {result['overhead_ratio']:.3f}   (median of {result['repeats']})")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in result["phase_share"].items())
    click.echo(f"time in the analysis:    {shares}")
    click.echo(f"peak RSS:                {result['peak_rss_mb']:.0f} MiB")
    if memory_scaling:
        runs = result["memory_scaling"]["runs"]
        for count, run in runs.items():
            click.echo(f"peak RSS, {count:>4} images:  {run['peak_rss_mb']:.0f} MiB (fresh process, {run['seconds']:.1f} s)")
        click.echo(f"ratio:                   {result['memory_scaling']['rss_ratio']:.3f}")


@app.command()
@click.option("--task", type=click.Choice(["rotate", "scale"]), default="rotate", show_default=True,
              help="rotate: digits rotated in [-90, 90] degrees; scale: zoomed in [0.5, 1].")
@click.option("--variants", default="all", show_default=True,
              help="Comma-separated: none, input, features@1..3, deep-input, shared@1..3, or 'all'.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--warp", type=click.Choice(["affine", "rotation", "rotation_scale"]), default="affine", show_default=True)
@click.option("--images", default=None, help="Folder with one sub-folder per class instead of the bundled digits.")
@click.option("--quick", is_flag=True, help="1 seed, 12 epochs: all variants in about a minute on 2 CPU cores.")
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-stn", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON records.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def stn(task, variants, seeds, epochs, warp, images, quick, out, force, as_json, debug) -> None:
    """Where should the spatial transformer go? Train STN variants on digits and compare.

    Trains each variant (seeds 0..N-1) on scikit-learn's digits, rotated or
    scaled (offline), and writes OUT/stn_results.csv (variant, task, seed,
    parameters, test/train accuracy, epochs, seconds), stn_alignment.csv (how
    far each trained model's maps of a transformed digit stay from those of
    the upright digit, per layer, relative to chance), stn_summary.csv and
    plots (accuracy by variant, learned warps).

    \b
    Examples:
      alignscope stn --quick
      alignscope stn --task scale --variants none,input,features@2,shared@2 --seeds 3 --epochs 40
    """
    from alignscope.report import check_destination
    from alignscope.stn import VARIANTS, run_experiment
    from alignscope.stn.experiment import QUICK

    chosen = list(VARIANTS) if variants.strip() == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    if quick:
        seeds, epochs = QUICK["seeds"], QUICK["epochs"]
    out_path = check_destination(out, force)
    echo = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    experiment = run_experiment(task, chosen, seeds, epochs, warp, images, progress=echo)
    experiment.save(out_path, force=force)
    summary = experiment.summary()
    if as_json:
        click.echo(summary.to_json(orient="records"))
        return
    from alignscope.report import format_table

    click.echo(format_table(summary, tuple(summary.columns)))
    click.echo(f"\nwritten to {out_path}/ (stn_results.csv, stn_alignment.csv, stn_summary.csv, plots)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click app, turning errors into one line and an exit code.

    Started from the command line (``argv`` None), it first re-executes itself
    once with glibc malloc tuned for large tensors (see :mod:`alignscope.allocator`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args and args[0] in ("analyze", "explain", "bench"):
        from alignscope.allocator import reexec_with_tuned_malloc

        reexec_with_tuned_malloc(args)
    debug = "--debug" in args
    try:
        app.main(args=args, prog_name="alignscope", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AlignscopeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # anything unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
