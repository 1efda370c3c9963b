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


TRANSFORM_HELP = (
    "Transform spec, repeatable: rotate30, scale0.8, translate16,-8, roll16,-8, shear15, hflip, vflip, "
    "rot90/180/270, identity; a+b composes (a first); rotate:-90:90:15 sweeps. Default: a set contrasting "
    "translations (alignable) with rotations, scalings and a flip."
)
IMAGES_HELP = "Folder (recursive), file or glob; repeat to use the union. Default: the bundled photos."
MASK_HELP = "disk: keep the centred disk of each image and compare only inside it; auto: disk for rotations and shears."


def _shared(command, options: list, fields: tuple[str, ...], build):
    """Add ``options`` to ``command`` and hand it ``build(values)`` instead of the ``fields``' values."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in fields if name in kwargs}
        return command(*args, **build(values, kwargs), **kwargs)

    run.__click_params__ = list(getattr(command, "__click_params__", []))
    for option in reversed(options):
        run = option(run)
    return run


def pair_options(command=None, *, one_transform: bool = False, images_default_help: str | None = None,
                 max_images_default: int | None = None, mask: bool = True, seed: bool = True, workers: bool = True):
    """Add the image-pair options (``--transform``, ``--images``, ``--max-images``, ``--batch-size``, ``--mask``,
    ``--seed``, ``--workers``); the command receives one validated PairOptions as ``pairs``.

    ``one_transform``: ``--transform`` takes one spec (default ``rot90``), not a repeatable list.
    """
    if command is None:
        return functools.partial(pair_options, one_transform=one_transform, images_default_help=images_default_help,
                                 max_images_default=max_images_default, mask=mask, seed=seed, workers=workers)
    if one_transform:
        transform = click.option("--transform", "transforms", default="rot90", show_default=True,
                                 help="One transform spec (see 'alignscope analyze --help').")
    else:
        transform = click.option("--transform", "transforms", multiple=True, help=TRANSFORM_HELP)
    declared = [
        transform,
        click.option("--images", multiple=True, help=images_default_help or IMAGES_HELP),
        click.option("--max-images", type=click.IntRange(min=2), default=max_images_default,
                     show_default=max_images_default is not None, help="Use at most N images (seeded sample, sorted)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
    ]
    if mask:
        declared.append(click.option("--mask", type=click.Choice(["auto", "disk", "none"]), default="auto",
                                     show_default=True, help=MASK_HELP))
    if workers:
        declared.append(click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                                     help="Processes decoding images (pinned memory on CUDA)."))
    if seed:
        declared.append(click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                                     help="Seed for image sampling and order (chance partners)."))

    def build(values: dict, rest: dict) -> dict:
        from alignscope.inputs.options import PairOptions

        transforms = values["transforms"]
        transforms = transforms if one_transform else (list(transforms) or None)
        return {"pairs": PairOptions.build(transforms, list(values["images"]) or None, values["batch_size"],
                                           values.get("mask", "auto"), values.get("seed", 0), values["max_images"],
                                           values.get("workers", 0))}

    fields = ("transforms", "images", "max_images", "batch_size", "mask", "workers", "seed")
    return _shared(command, declared, fields, build)


def run_options(command=None, *, outputs: bool = True):
    """Add ``--amp`` and ``--channels-last`` (and, with ``outputs``, ``--per-image``, ``--no-output`` and
    ``--placement``); the command receives one RunOptions as ``run``."""
    if command is None:
        return functools.partial(run_options, outputs=outputs)
    declared = [
        click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True,
                     help="Run the model under autocast; maps are compared in float32, statistics kept in float64."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="NHWC tensors for the model (default: on for CUDA)."),
    ]
    if outputs:
        declared += [
            click.option("--per-image", is_flag=True, help="Also write per_image.csv with one row per image."),
            click.option("--no-output", is_flag=True,
                         help="Skip the output row (top-1 agreement and softmax KL between x and g x), measured by "
                              "default for models with a classifier head; forward passes then stop after the deepest layer."),
            click.option("--lie", is_flag=True,
                         help="Add the Lie-derivative rows: per layer and at the output, the derivative along six "
                              "continuous transformations (translations, rotation, scale, shears) at the identity. "
                              "Costs one forward-mode pass per generator and batch."),
            click.option("--lie-generator", "lie_generators", multiple=True,
                         type=click.Choice(["translate_x", "translate_y", "rotate", "scale", "shear_x", "shear_y"]),
                         help="With --lie (implies it): only this generator (repeatable)."),
            click.option("--placement", is_flag=True,
                         help="Add the placement rows: the prediction when each layer's output of g x is replaced by "
                              "g^-1 of it (an exact STN there), against f(x), and the placement figure. Costs one more "
                              "forward pass per layer, transform and image (and per fit asked for)."),
        ]

    def build(values: dict, rest: dict) -> dict:
        from alignscope.engine.options import RunOptions

        return {"run": RunOptions(values["amp"], values["channels_last"], not values.get("no_output", False),
                                  values.get("per_image", False), values.get("placement", False),
                                  tuple(values.get("lie_generators") or ()) or values.get("lie", False))}

    return _shared(command, declared, ("amp", "channels_last", "per_image", "no_output", "placement", "lie", "lie_generators"), build)


def _parse_ridge(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise click.BadParameter(f"{text!r} is neither 'auto' nor a finite number >= 0", param_hint="--ridge")
    return value


def fit_options(command=None, *, tuning: bool = True, min_calibration: int = 1):
    """Add ``--optimal``, ``--channel-map`` and ``--calibration-images`` (and, with ``tuning``, ``--ridge`` and
    ``--search-steps``); the command receives one FitRequest as ``fits``."""
    if command is None:
        return functools.partial(fit_options, tuning=tuning, min_calibration=min_calibration)
    declared = [
        click.option("--optimal", multiple=True, type=click.Choice(["family", "affine"]),
                     help="Also search the best spatial warp: 'family' frees g's own parameters plus a shift "
                          "(optimal_error), 'affine' all six affine entries (optimal_affine_error). Cost: a few "
                          "Gauss-Newton steps per start over the calibration maps per layer and transform, large maps "
                          "first on their 2 x 2 averages."),
        click.option("--channel-map", "channel_map", multiple=True, type=click.Choice(["linear", "permutation"]),
                     help="Also re-mix channels after the inverse warp: 'linear' a ridge least-squares C x C map "
                          "(channel_mapped_error), 'permutation' the best channel relabelling (permuted_error). Cost: "
                          "C x C statistics per layer and transform, one C^3 solve (linear) or assignment (permutation)."),
        click.option("--calibration-images", type=click.IntRange(min=min_calibration), default=None,
                     help="Images the fits are calibrated on (default: half, at most 16); all columns are then "
                          "measured on the rest."),
    ]
    if tuning:
        declared += [
            click.option("--ridge", default="auto", show_default=True,
                         help="Ridge of the linear channel map, or 'auto' (two-fold cross-validation)."),
            click.option("--search-steps", type=click.IntRange(min=0), default=60, show_default=True,
                         help="At most this many descent steps per start of the warp search (it stops earlier at its "
                              "tolerance)."),
        ]

    def build(values: dict, rest: dict) -> dict:
        from alignscope.fit.fitting import FitRequest

        return {"fits": FitRequest.build(list(values["optimal"]) or None, list(values["channel_map"]) or None,
                                         _parse_ridge(values.get("ridge", "auto")), values.get("search_steps", 60),
                                         values["calibration_images"])}

    return _shared(command, declared, ("optimal", "channel_map", "calibration_images", "ridge", "search_steps"), build)
