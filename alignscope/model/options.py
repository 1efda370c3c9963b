"""The model options every entry point shares, said once.

:class:`ModelOptions` names the model (a timm name or an ``nn.Module``), its
weights, how images are prepared for it (``input_size``, ``mean``, ``std``),
which layers are measured and the device. :func:`alignscope.analyze`,
:func:`alignscope.explain.explain` and :func:`alignscope.bench.bench.benchmark` take
one as ``model=`` and still accept the same settings as keyword arguments;
either way :meth:`ModelOptions.build` turns them into one object, which is
validated when it is made (a bad value fails before any model loads),
loaded by :meth:`ModelOptions.load`, written to ``run.json`` by
:meth:`ModelOptions.as_json` and handed to a fresh process by
:meth:`ModelOptions.argv` (the command line's flags; the ``alignscope``
commands read them back with one shared decorator).

Conventions: ``input_size`` is (C, H, W) in pixels, or (H, W), or one int S
for S x S (C then comes from the model's data config, 3 for a module);
``mean`` / ``std`` are per input channel for pixel values in [0, 1].
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UsageError, UsageTypeError
from .build import DEFAULT_MODEL, DataConfig, data_config_for_module, load_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # an nn.Module's default normalization
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a usage error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return dev


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def _sizes(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    try:
        sizes = tuple(value)
    except TypeError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2  # one size S: S x S
    whole = [isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and v >= 1
             for v in sizes]
    if len(sizes) not in (2, 3) or not all(whole):
        raise UsageError(f"input_size must be (C, H, W), (H, W) or one size S of positive integers, got {value!r}")
    return tuple(int(v) for v in sizes)


def _per_channel(name: str, value: Any, positive: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be numbers, one per input channel, got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers) or (positive and min(numbers) <= 0):
        rule = "finite numbers above 0" if positive else "finite numbers"
        raise UsageError(f"{name} must be {rule}, one per input channel, got {value!r}")
    return numbers


def _layer_request(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        items = (value,) if isinstance(value, str) else tuple(value)
    except TypeError:
        items = (value,)
    if not all(isinstance(item, str) for item in items):
        raise UsageTypeError(f"layers must be module names, globs or 'all' (strings), got {value!r}")
    items = tuple(item for item in items if item.strip())
    if not items:
        raise UsageError(f"layers={value!r} selects no layer; pass None for the model's stages, 'all', or module "
                         "names / globs")
    return items


@dataclass(frozen=True)
class ModelOptions:
    """Which model with which weights, fed how, measured at which layers, on which device.

    ``model``: a timm name or an ``nn.Module`` (which needs ``input_size``;
    ``mean``/``std`` default to ImageNet's). ``weights``: ``"auto"`` (see
    :func:`~alignscope.model.build.load_model`) or a checkpoint path; timm names
    only. ``pretrained``: ``False`` keeps timm's random initialisation; for a
    module it says whether its weights are trained (reports flag random ones).
    ``input_size``, ``mean``, ``std``: override the model's data config
    (``None``: timm's ``pretrained_cfg``). ``layers``: ``None`` (the model's
    stages), ``"all"``, or module names and globs. ``device``: ``cpu``,
    ``cuda``, ``cuda:N`` or ``auto``.

    Values are checked and normalized when the object is made (tuples,
    ``weights=None`` -> ``"auto"``); :func:`dataclasses.replace` checks again.
    """

    model: str | nn.Module = DEFAULT_MODEL
    weights: str | None = "auto"
    pretrained: bool = True
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layers: tuple[str, ...] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize in place once, here
        if not isinstance(self.model, nn.Module) and not (isinstance(self.model, str) and self.model.strip()):
            raise UsageError(f"model must be a timm model name or an nn.Module, got {self.model!r}")
        weights = "auto" if self.weights is None else os.fspath(self.weights) if isinstance(self.weights, os.PathLike) else self.weights
        if not isinstance(weights, str) or not weights:
            raise UsageError(f"weights must be 'auto' or the path of a checkpoint, got {self.weights!r}")
        if isinstance(self.model, nn.Module) and weights != "auto":
            raise UsageError("weights= applies to timm model names; load the checkpoint into your module "
                             "(module.load_state_dict) or pass the model's timm name")
        if not isinstance(self.pretrained, bool):
            raise UsageError(f"pretrained must be True or False, got {self.pretrained!r}")
        mean, std = _per_channel("mean", self.mean, positive=False), _per_channel("std", self.std, positive=True)
        if mean is not None and std is not None and len(mean) != len(std):
            raise UsageError(f"mean has {len(mean)} values and std {len(std)}; give one of each per input channel")
        device = str(self.device)
        if device != "auto":
            _parse_device(device)
        sizes = _sizes(self.input_size)
        if sizes is not None and len(sizes) == 3:  # the channels are known now: no need to wait for the model
            for name, values in (("mean", mean), ("std", std)):
                if values is not None and len(values) != sizes[0]:
                    raise UsageError(f"{name} (--{name}) has {len(values)} value(s) but input_size has {sizes[0]} "
                                     f"channel(s); give one per input channel")
        set_(self, "weights", weights)
        set_(self, "input_size", sizes)
        set_(self, "mean", mean)
        set_(self, "std", std)
        set_(self, "layers", _layer_request(self.layers))
        set_(self, "device", device)

    # --- the one place keyword arguments become options ---------------------------------------

    @classmethod
    def build(cls, model: "str | nn.Module | ModelOptions" = DEFAULT_MODEL, **settings: Any) -> "ModelOptions":
        """``model`` as options: a :class:`ModelOptions` as it is, or a name/module with ``settings``.

        ``settings`` are the other fields as keyword arguments (what
        ``analyze()``, ``explain()`` and ``benchmark()`` accept). With a
        :class:`ModelOptions`, a setting away from its default fills the
        field the options leave at its default; one that contradicts a value
        the options set is refused as ambiguous.
        """
        unknown = sorted(set(settings) - {f.name for f in fields(cls)} - {"model"})
        if unknown:
            raise UsageError(f"unknown model option(s) {', '.join(unknown)}")
        if not isinstance(model, ModelOptions):
            return cls(model=model, **settings)
        given, default = cls(**settings), cls()
        changes = {name: getattr(given, name) for name in settings if getattr(given, name) != getattr(default, name)}
        clashes = [name for name, value in changes.items() if getattr(model, name) not in (getattr(default, name), value)]
        if clashes:
            shown = ", ".join(f"{name}={changes[name]!r} (the options say {getattr(model, name)!r})" for name in clashes)
            raise UsageError(f"{shown} given beside model=ModelOptions(...); set each value in one place")
        return replace(model, **changes) if changes else model

    # --- using them -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The timm name, or the module's class name."""
        return self.model if isinstance(self.model, str) else type(self.model).__name__

    def resolve_device(self) -> torch.device:
        """The device to run on (``auto`` resolved; CUDA asked for without CUDA is a usage error)."""
        return resolve_device(self.device)

    def load(self) -> tuple[nn.Module, DataConfig]:
        """The model in eval mode and the data config its images are prepared with.

        A timm name loads with :func:`~alignscope.model.build.load_model`;
        ``input_size``, ``mean`` and ``std`` then replace the values from
        its ``pretrained_cfg`` (the weights' provenance stays). The config is
        checked: one ``mean`` and ``std`` value per input channel.
        """
        if isinstance(self.model, nn.Module):
            if self.input_size is None:
                raise UsageError("analyzing an nn.Module needs input_size=(C, H, W) (and usually mean, std)")
            cfg = data_config_for_module(self.model, self.input_size, self.mean or IMAGENET_MEAN, self.std or IMAGENET_STD,
                                         pretrained=self.pretrained)
            module = self.model.eval()
        else:
            module, cfg = load_model(self.model, weights=self.weights, pretrained=self.pretrained)
            changes: dict[str, Any] = {}
            if self.input_size is not None:
                changes["input_size"] = self.input_size if len(self.input_size) == 3 else (cfg.input_size[0], *self.input_size)
            if self.mean is not None:
                changes["mean"] = self.mean
            if self.std is not None:
                changes["std"] = self.std
            cfg = replace(cfg, **changes)
        validate_data_config(cfg)
        return module, cfg

    def as_json(self) -> dict[str, Any]:
        """The options as asked for (``run.json``'s ``model_options`` block); a module is named by its class."""
        values = asdict(replace(self, model=DEFAULT_MODEL)) if isinstance(self.model, nn.Module) else asdict(self)
        values["model"] = self.model if isinstance(self.model, str) else f"nn.Module {type(self.model).__name__}"
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    def argv(self) -> list[str]:
        """The ``alignscope`` command-line flags that give these options (a checkpoint path made absolute)."""
        if isinstance(self.model, nn.Module):
            raise UsageError("an nn.Module cannot be handed to a fresh alignscope process; pass a timm name")
        args = ["--model", self.model, "--device", self.device]
        if self.weights != "auto":
            args += ["--weights", os.path.abspath(self.weights)]
        if not self.pretrained:
            args.append("--no-pretrained")
        for flag, values in (("--input-size", self.input_size), ("--mean", self.mean), ("--std", self.std)):
            if values is not None:
                args += [flag, ",".join(_number_text(v) for v in values)]
        for layer in self.layers or ():
            args += ["--layers", layer]
        return args


def _number_text(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


def validate_data_config(cfg: DataConfig) -> None:
    """One ``mean`` and one ``std`` per input channel (``zip`` would silently drop the rest)."""
    channels = cfg.input_size[0]
    if not len(cfg.mean) == len(cfg.std) == channels:
        raise UsageError(f"mean has {len(cfg.mean)} and std {len(cfg.std)} values for {channels} input channels "
                         f"(input_size {tuple(cfg.input_size)}); give one of each per channel")
