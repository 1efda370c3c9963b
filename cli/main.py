"""``alignscope`` command line: analyze, layers, models, plot, compare (explain, bench, stn: experiments.py; check: audit.py).

Errors the library raises on purpose print as one line and exit 2 (usage)
or 1 (runtime); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

import click

from alignscope.cli.app import app
from alignscope.cli.options import DEFAULT_MODEL, fit_options, model_options, pair_options, run_options
from alignscope.errors import AlignscopeError, UsageError

EPILOG_ANALYZE = """\b
Examples:
  alignscope analyze                                   # offline default: EfficientNet-Lite0, bundled photos
  alignscope analyze --transform rot90 --transform translate32,0
  alignscope analyze --model resnet50 --weights resnet50.safetensors --transform rotate30
  alignscope analyze --transform rotate:-90:90:15 --layers 'blocks.*' --images photos/ --max-images 64
  alignscope analyze --json --no-plots --out run1 > table.json
  alignscope analyze --transform rot90 --optimal family --channel-map permutation --channel-map linear
"""

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





def _image_paths(pairs) -> tuple:
    """The image paths a report folder must not overlap (none for the bundled photos)."""
    return tuple(pairs.images or ())


@app.command(epilog=EPILOG_ANALYZE)
@model_options
@pair_options
@run_options
@fit_options
@click.option("--out", type=click.Path(file_okay=False), default="alignscope-report", show_default=True, help="Report folder.")
@click.option("--force", is_flag=True, help="Overwrite an existing report folder.")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON records on stdout instead of text.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--fail-above", multiple=True, metavar="COLUMN=NUMBER",
              help="Gate: after writing the report, print the rows above this limit and exit 1 (see 'alignscope check').")
@click.option("--fail-below", multiple=True, metavar="COLUMN=NUMBER", help="Gate: the same for a lower limit.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def analyze(options, pairs, run, fits, out, force, no_plots, as_json, quiet, fail_above, fail_below, debug) -> None:
    """Measure per layer how well the inverse warp aligns feature maps.

    Writes OUT/alignment.csv, OUT/run.json and plots, prints a compact table
    and one verdict per transform.
    """
    import alignscope
    from alignscope.report.report import validate_destination

    from alignscope.runtime.distributed import launched_world_size
    from alignscope.report.gate import validate_limit_columns, parse_limit

    for text in fail_above + fail_below:  # malformed limits and unknown columns fail before the work
        option = "--fail-above" if text in fail_above else "--fail-below"
        validate_limit_columns([parse_limit(text, option)[0]], option)
    out_path = validate_destination(out, force, inputs=_image_paths(pairs))  # before the work, not after it
    main_rank = os.environ.get("RANK", "0") == "0" or launched_world_size() <= 1
    update, finish = _progress(not quiet and main_rank and sys.stderr.isatty())
    try:
        report = alignscope.analyze(model=options, pairs=pairs, run=run, fits=fits, progress=update)
    finally:
        if finish:
            finish()
    if report.meta.get("rank", 0) != 0:
        return  # under torchrun only rank 0 writes and prints
    report.save(out_path, force=force, plots=not no_plots, inputs=_image_paths(pairs))
    if as_json:
        click.echo(report.table.to_json(orient="records"))
    elif not quiet:
        _print_summary(report, out_path)
    if fail_above or fail_below:
        from alignscope.cli.audit import enforce_limits

        enforce_limits(report.table, fail_above, fail_below)


def _print_summary(report, out_path: Path) -> None:
    import shutil

    from alignscope.columns import FITTED_SUMMARY, SUMMARY_COLUMNS
    from alignscope.report.grid import SummaryGrid, short_verdicts
    from alignscope.report.output_rows import layer_rows
    from alignscope.report.report import format_table

    meta = report.meta
    weights_note = "" if meta.get("pretrained", True) else "  [RANDOM WEIGHTS: not pretrained]"
    split = ""
    if "fits" in meta:
        split = f" held out ({len(meta['fits']['calibration_images'])} more calibrated the fits)"
    click.echo(f"{meta['model']} · {len(meta['images_used'])} images{split} · weights: {meta['weights']}{weights_note}")
    skipped = meta.get("layers_skipped") or []
    if skipped:  # dropped default stages above all: the table alone would hide them
        shown = "; ".join(f"{entry['layer'] or 'the root module'} ({entry['reason']})" for entry in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        click.echo(f"layers left out ({len(skipped)}, run.json layers_skipped): {shown}{more}")
    grid = SummaryGrid.from_table(report.table)
    if grid.transforms:  # one screen: transforms x layers, then one short line per transform
        click.echo(grid.text(max(80, shutil.get_terminal_size((80, 24)).columns)))
        click.echo("")
        for line in short_verdicts(report.table):
            click.echo(line)
    fitted = tuple(c for c in FITTED_SUMMARY if c in report.table.columns)
    sweeps = "sweep" in report.table and report.table["sweep"].fillna("").astype(str).ne("").any()
    if fitted or sweeps or not grid.transforms:  # what the grid does not show: fitted alignments, sweep values
        columns = SUMMARY_COLUMNS[:4] + fitted + SUMMARY_COLUMNS[4:] if fitted else SUMMARY_COLUMNS
        click.echo("")
        click.echo(format_table(layer_rows(report.table), columns))
    _print_placement(report.table)
    from alignscope.report.lie import lie_text

    text = lie_text(report.table, max(80, shutil.get_terminal_size((80, 24)).columns))
    if text:
        click.echo("\n" + text)
    warnings = report.warnings()
    if warnings:  # each in full in report.html
        click.echo(f"\ncaveats ({len(warnings)}):")
        for line in warnings:
            click.echo(f"- {line if len(line) <= 160 else line[:159] + '…'}")
    click.echo(f"\nreport written to {out_path}/")


def _print_placement(table) -> None:
    """The placement grid and one line per transform (with --placement), the costliest modules with many layers."""
    import shutil

    from alignscope.report.output_rows import placement_rows
    from alignscope.report.placement import PlacementGrid, costliest_modules, placement_verdicts
    from alignscope.report.report import format_table

    if placement_rows(table).empty:
        return
    click.echo("")
    grid = PlacementGrid.from_table(table)
    if len(grid.places) <= 16:
        click.echo(grid.text(max(80, shutil.get_terminal_size((80, 24)).columns)))
    else:  # --layers all: the grid would fill screens; the lines and the costliest modules say it
        click.echo(f"placement at {len(grid.places)} places: see report.html, or alignment.csv (kind = placement)")
    click.echo("")
    for line in placement_verdicts(table):
        click.echo(line)
    costly = costliest_modules(table)
    if placement_rows(table)["layer"].nunique() > 16 and (costly["placement_drop"] > 0).any():  # --layers all
        click.echo("\nlargest drops in agreement between one place and the next:")
        click.echo(format_table(costly, ("transform", "layer", "placement_drop", "placed_agreement")))


@app.command()
@click.argument("model_name", metavar="[MODEL]", required=False)
@model_options(layers=False)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Also list modules without spatial output and duplicates.")
@click.option("--lattice-all", is_flag=True, help="Measure offset_x/offset_y for every listed spatial module, not only the stages (one backward pass each).")
def layers(model_name: str | None, options, fmt: str, show_all: bool, lattice_all: bool) -> None:
    """List MODEL's modules: output C x H x W, layout, stride, lattice offsets, default stage.

    Shapes need no weights: the model is probed with random weights unless
    --weights gives a checkpoint (which is then checked to fit); the model
    options are those of every command (--input-size probes at another size).
    MODEL may be given as argument or --model.

    \b
    Examples:
      alignscope layers tf_efficientnet_lite0
      alignscope layers --model vit_tiny_patch16_224 --all
      alignscope layers resnet50 --format csv > layers.csv
    """
    from dataclasses import replace

    import pandas as pd

    from alignscope.model.capture import probe_layers
    from alignscope.model.lattice import Lattice
    from alignscope.model.lattice_probe import measure_lattices
    from alignscope.report.files import csv_text
    from alignscope.report.verdicts import lattice_reason_label

    if model_name and options.model not in (model_name, DEFAULT_MODEL):
        raise UsageError(f"two models given ({model_name} and --model {options.model}); name one")
    # shapes need no trained weights: random ones unless a checkpoint is given (then checked to fit)
    options = replace(options, model=model_name or options.model, pretrained=options.weights != "auto")
    model, device = options.model, options.resolve_device()
    net, cfg = options.load()
    net = net.to(device)
    probed = probe_layers(net, cfg.input_size, device)
    listed = [layer for layer in probed if layer.spatial and (show_all or not layer.reason)]
    lattices = measure_lattices(net, [layer for layer in listed if lattice_all or layer.default] or listed, cfg.input_size,
                                device)
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
            "layout": str(layer.layout) if layer.spatial else "",
            "offset_x": lattices[layer.name].offset_x if isinstance(lattices.get(layer.name), Lattice) else "",
            "offset_y": lattices[layer.name].offset_y if isinstance(lattices.get(layer.name), Lattice) else "",
            "no_lattice": lattice_reason_label(lattices[layer.name]) if isinstance(lattices.get(layer.name), str) else "",
            "default": layer.default,
            "note": layer.reason,
            "lattice_note": lattices[layer.name] if isinstance(lattices.get(layer.name), str) else "",
        })
    table = pd.DataFrame(rows)
    if table.empty:
        raise UsageError(f"{model} gives no module output at input {'x'.join(map(str, cfg.input_size))}; "
                         "pass a larger --input-size")
    if fmt == "csv":
        click.echo(csv_text(table), nl=False)
    elif fmt == "json":
        click.echo(table.to_json(orient="records"))
    else:
        click.echo(f"{model}: input {'x'.join(map(str, cfg.input_size))}, {len(table)} modules listed "
                   f"(output = C x H x W as read through layout; stride = input height / map height, a fraction means "
                   f"translations are interpolated; default = stages from timm feature_info; cell (i, j) "
                   f"sits at input pixel (stride j + offset_x, stride i + offset_y), measured"
                   f"{'' if lattice_all else ' for the stages (--lattice-all: every module)'}; centred frame: (stride - 1) / 2)")
        click.echo(table.drop(columns=["lattice_note"] + ([] if show_all else ["note"])).to_string(index=False))
        missing = table[table["lattice_note"] != ""]
        if len(missing):
            click.echo(f"no_lattice: no offsets measured for {len(missing)} listed layers; e.g. {missing.iloc[0]['name']}: "
                       f"{missing.iloc[0]['lattice_note']} (--format csv or json gives each reason)")


@app.command()
def models() -> None:
    """List models whose pretrained weights are available offline on this machine."""
    from alignscope.model.build import offline_model_table

    rows = offline_model_table()
    click.echo("Pretrained weights available offline now:")
    for row in rows:
        click.echo(f"  {row['model']:<28} {row['weights']}")
    if not rows:
        click.echo("  (none)")
    from alignscope.model.offline_weights import missing_offline_weights

    for entry in missing_offline_weights():
        click.echo(f"  {entry.name:<28} not installed: {entry.description}")
    click.echo(
        "\nEvery timm model works (CNNs, ViTs, Swins: see alignscope layers): with internet, timm fetches its pretrained weights from the hub; offline, pass a\n"
        "local checkpoint with --weights FILE, or --no-pretrained for random weights."
    )


@app.command()
@click.argument("csv", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for the PNGs (default: the CSV's folder).")
@click.option("--force", is_flag=True, help="Overwrite existing PNGs.")
def plot(csv: str, out: str | None, force: bool) -> None:
    """Redraw the plots of a report from its alignment.csv."""
    from alignscope.errors import ReportExistsError
    from alignscope.report.files import is_alignscope_folder, mark_folder, record_files
    from alignscope.report.figures import report_figures
    from alignscope.report.plots import save_figures
    from alignscope.report.report import read_report_csv

    table = read_report_csv(csv)
    folder = Path(out) if out else Path(csv).parent
    if folder.exists() and not folder.is_dir():
        raise ReportExistsError(f"{folder} exists and is not a folder; choose another --out")
    fresh = not folder.exists() or not any(folder.iterdir())
    if not fresh and not is_alignscope_folder(folder):
        raise ReportExistsError(f"{folder} is not empty and is not an alignscope result folder; plots go only into "
                                "alignscope folders or new/empty ones: choose another --out")
    figures = report_figures(table)
    clashes = [folder / f"{stem}.png" for stem in figures if (folder / f"{stem}.png").exists()]
    if clashes and not force:
        raise ReportExistsError(f"{clashes[0]} exists; pass --force to overwrite plots or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    saved = save_figures(figures, folder)
    if fresh:
        mark_folder(folder, "plots")
    else:
        record_files(folder, [path.name for path in saved])
    for path in saved:
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
    from alignscope.report.comparison import (combine_runs, comparison_table, prediction_comparison, run_sizes,
                                             validate_distinct_runs)
    from alignscope.report.plots import depth_figure, save_figures
    from alignscope.report.files import csv_text
    from alignscope.report.report import publish_folder, read_report_csv

    validate_distinct_runs(csvs)
    combined = combine_runs([read_report_csv(path) for path in csvs], csvs)

    def write(folder: Path) -> None:
        (folder / "comparison.csv").write_text(csv_text(combined), encoding="utf-8")
        save_figures({"comparison_by_depth": depth_figure(combined)}, folder)

    publish_folder(Path(out), write, force, kind="comparison", inputs=csvs)
    click.echo("runs: " + "; ".join(f"{run} ({n} images)" for run, n in run_sizes(combined).items()))
    wide = comparison_table(combined)
    if len(wide):
        two = "; difference = second run - first, intervals_overlap: their 95% intervals overlap" if "difference" in wide else ""
        click.echo(f"aligned_error by transform and depth (transforms every run measured{two}):")
        click.echo(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    predictions = prediction_comparison(combined)
    if len(predictions):
        click.echo("\nprediction_agreement by transform (the output rows; NaN: a run without that transform or head):")
        click.echo(predictions.to_string(float_format=lambda v: f"{v:.3f}"))
    if "kind" in combined and combined["kind"].astype(str).isin(["placement", "lie"]).any():
        click.echo("\nplacement and Lie-derivative rows are not compared here; they are in comparison.csv with the rest")
    click.echo(f"\ncomparison written to {out}/ (comparison.csv holds every row of every run)")




# Commands defined elsewhere register themselves on ``app`` when imported (they import only cli.app).
from alignscope.cli import audit, experiments  # noqa: E402,F401  (registers check; explain, bench, stn)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that staging folders and temporary files are removed."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click app, turning errors into one line and an exit code.

    glibc malloc is tuned for large tensors and oneDNN's primitive cache bounded first (see
    :mod:`alignscope.runtime.allocator`);
    SIGTERM is handled like Ctrl-C, so a half-written result is cleaned up; Python
    warnings from libraries are silenced unless ``--debug`` (the ones a user can act
    on are reported by alignscope itself as one line each).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line: the group takes it, whichever command follows
        args = ["--debug", *(arg for arg in args if arg != "--debug")]
    from alignscope.runtime.allocator import bound_onednn_cache, tune_malloc

    bound_onednn_cache()  # before torch runs a convolution: oneDNN reads it once
    tune_malloc()
    previous_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            code = _run(args, debug)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    sys.exit(code)


def _run(args: list[str], debug: bool) -> int:
    """The click app with every outcome turned into an exit code (and at most one line on stderr)."""
    try:
        app.main(args=args, prog_name="alignscope", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as exc:
        # one line, not click's usage block: what was wrong, and where the help is
        command = exc.ctx.command_path if exc.ctx is not None else "alignscope"
        click.echo(f"error: {command}: {exc.format_message()} (see '{command} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except AlignscopeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Terminated:
        click.echo("terminated", err=True)
        return 143
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # anything unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    main()
