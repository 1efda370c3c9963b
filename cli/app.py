"""The ``alignscope`` click group: every command module registers on it, and imports nothing else from the CLI."""
from __future__ import annotations

import logging

import click

from alignscope._version import __version__


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
