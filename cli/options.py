"""The model options of every command that loads a model, declared once.

:func:`model_options` adds ``--model``, ``--weights``, ``--no-pretrained``,
``--input-size``, ``--mean``, ``--std`` and ``--device`` (and, where a
command measures several layers, ``--layers``) with the same names, defaults
and help everywhere, and hands the command one
:class:`~alignscope.model.options.ModelOptions` as ``options`` instead of the
separate values. :meth:`ModelOptions.argv <alignscope.model.options.ModelOptions.argv>`
writes the same flags back for a fresh process.
"""
from __future__ import annotations

import functools

import click

DEFAULT_MODEL = "tf_efficientnet_lite0"  # alignscope.model.build.DEFAULT_MODEL, repeated so --help loads no torch

MODEL_FIELDS = ("model", "weights", "no_pretrained", "input_size", "mean", "std", "device")


class Numbers(click.ParamType):
    """Comma-separated numbers, ``3,224,224`` or ``0.5,0.5,0.5``, as a tuple."""

    name = "N,N,..."

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.kind(part) for part in str(value).split(","))
        except ValueError:
            what = "integers" if self.kind is int else "numbers"
            self.fail(f"{value!r} is not comma-separated {what}", param, ctx)


LAYERS_HELP = "Module names, globs ('blocks.*') or 'all'; repeatable. Default: the model's stages."

_MODEL_OPTIONS = (  # in the order --help lists them
    click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name."),
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help="Local checkpoint (.pth/.pt/.safetensors) for the model. Default: offline weights or timm's hub weights."),
    click.option("--no-pretrained", is_flag=True, help="Random initialisation (reports say so)."),
    click.option("--input-size", type=Numbers(int), default=None, metavar="C,H,W|H,W|S",
                 help="Image size fed to the model: C,H,W, H,W or S (S x S). Default: the model's pretrained config."),
    click.option("--mean", type=Numbers(float), default=None, metavar="M1,M2,...",
                 help="Normalization mean per input channel, for pixels in [0, 1]. Default: the model's pretrained config."),
    click.option("--std", type=Numbers(float), default=None, metavar="S1,S2,...",
                 help="Normalization std per input channel. Default: the model's pretrained config."),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
)


def model_options(command=None, *, layers: bool = True):
    """Add the shared model options to a click command; it receives them as ``options`` (a ModelOptions).

    ``layers``: also add ``--layers`` (repeatable). A command that takes one
    layer under another name (``explain --layer``) sets it on ``options``
    itself.
    """
    if command is None:
        return functools.partial(model_options, layers=layers)

    @functools.wraps(command)
    def run(*args, **kwargs):
        from alignscope.model.options import ModelOptions

        values = {name: kwargs.pop(name) for name in MODEL_FIELDS}
        chosen = kwargs.pop("layers") if layers else None
        kwargs["options"] = ModelOptions(
            model=values["model"], weights=values["weights"], pretrained=not values["no_pretrained"],
            input_size=values["input_size"], mean=values["mean"], std=values["std"], device=values["device"],
            layers=list(chosen) if chosen else None)
        return command(*args, **kwargs)

    run.__click_params__ = list(getattr(command, "__click_params__", []))  # the command's own options, not shared
    if layers:
        run = click.option("--layers", multiple=True, help=LAYERS_HELP)(run)
    for option in reversed(_MODEL_OPTIONS):
        run = option(run)
    return run
