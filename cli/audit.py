"""``alignscope check``: gate a report on numeric limits (exit 1 when a row breaks one).

It registers on the group defined in :mod:`alignscope.cli.main`; ``analyze
--fail-above/--fail-below`` reuse :func:`enforce_limits`.
"""
from __future__ import annotations

import click

from alignscope.cli.app import app

LIMIT_HELP = "repeatable; any numeric column of alignment.csv"


def enforce_limits(table, maximum=(), minimum=(), layers=(), transforms=()) -> None:
    """Print the rows of ``table`` that break the limits and raise :class:`LimitsBroken` (exit 1); else one ok line."""
    from alignscope.errors import LimitsBroken
    from alignscope.report.gate import check, checked_rows, gate_summary
    from alignscope.report.report import format_table

    failing = check(table, max=list(maximum), min=list(minimum), layers=list(layers) or None,
                    transforms=list(transforms) or None)
    limited = [c for c in dict.fromkeys(text.partition("=")[0].strip() for text in (*maximum, *minimum))]
    checked = checked_rows(table, list(layers) or None, list(transforms) or None, limited)
    summary = gate_summary(failing, checked)
    if failing.empty:
        click.echo(f"ok: {summary}", err=True)
        return
    which = ("placed_by",) if "placed_by" in failing and failing["placed_by"].notna().any() else ()  # inverse, perm, ...
    columns = (("model",) if table["model"].nunique() > 1 else ()) + ("layer", "transform", *which, *limited, "breaks")
    click.echo(format_table(failing, tuple(dict.fromkeys(columns))))
    raise LimitsBroken(summary)


@app.command()
@click.argument("csv", type=click.Path())
@click.option("--max", "maximum", multiple=True, metavar="COLUMN=NUMBER", help=f"Upper limit, {LIMIT_HELP}.")
@click.option("--min", "minimum", multiple=True, metavar="COLUMN=NUMBER", help=f"Lower limit, {LIMIT_HELP}.")
@click.option("--layers", multiple=True, help="Check only these layers (names or globs, repeatable).")
@click.option("--transforms", "--transform", "transforms", multiple=True, help="Check only these transforms (specs or globs, repeatable).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def check(csv: str, maximum: tuple[str, ...], minimum: tuple[str, ...], layers: tuple[str, ...],
          transforms: tuple[str, ...], debug: bool) -> None:
    """Gate a report: print the rows of CSV that break a limit and exit 1; exit 0 when all pass.

    A NaN in a limited column breaks the limit (it cannot be checked). A
    column the table lacks, or a filter that matches no row, is a usage
    error (exit 2), so a typo never passes a gate.

    \b
    Examples:
      alignscope check report/alignment.csv --max aligned_error=0.5
      alignscope check report/alignment.csv --max aligned_error=0.6 --layers 'blocks.*' --transforms rot90
    """
    from alignscope.report.report import read_report_csv

    enforce_limits(read_report_csv(csv), maximum, minimum, layers, transforms)
