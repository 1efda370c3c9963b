"""Forward hooks: which modules produce spatial feature maps, and capturing them.

:func:`probe_layers` runs the model once on a dummy input and records, for
every module, its output shape, its stride relative to the input and the
order in which it ran. :func:`select_layers` turns a user's layer request into
probed layers. :class:`FeatureCapture` attaches hooks to chosen modules,
returns their outputs for a batch, stops the forward pass once the deepest
chosen module has run, and removes every hook on exit, also on error.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from .errors import LayerError

if TYPE_CHECKING:
    from .lattice import Lattice


@dataclass
class LayerInfo:
    """One module's output as seen by the probe.

    ``shape`` is (C, H, W) for spatial maps; ``stride`` is input height divided
    by output height. ``order`` is the position in execution order (hooks fire
    when a module returns, so a container comes after its children).
    ``lattice``: where its cells sit on the input, once measured
    (:func:`alignscope.lattice.attach_lattices`).
    """

    name: str
    module_type: str
    order: int
    spatial: bool
    shape: tuple[int, ...] | None = None
    stride: float | None = None
    reason: str = ""
    default: bool = False
    overwritten_in_place: bool = False
    lattice: Lattice | None = None

    @property
    def channels(self) -> int:
        return int(self.shape[0]) if self.shape else 0


def _describe_output(output: object) -> tuple[bool, tuple[int, ...] | None, str]:
    if isinstance(output, torch.Tensor):
        if output.ndim == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            return True, tuple(int(s) for s in output.shape[1:]), ""
        shape = " x ".join(str(s) for s in output.shape)
        return False, tuple(int(s) for s in output.shape[1:]), f"output is {output.ndim}-D ({shape}), not a spatial map"
    return False, None, f"output is a {type(output).__name__}, not a tensor"


def _stage_names(model: nn.Module) -> list[str]:
    """Module names of the model's stages from timm's ``feature_info``, if it has one."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name"):  # timm FeatureInfo object (features_only models)
        return list(info.module_name())
    try:
        return [entry["module"] for entry in info if "module" in entry]
    except (TypeError, KeyError):
        return []


def probe_layers(model: nn.Module, input_size: Sequence[int], device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Run ``model`` once on a zero batch of ``input_size`` (C, H, W) and describe every module."""
    outputs: dict[str, object] = {}
    versions: dict[str, int] = {}
    order: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            order[name] = len(order)
            outputs[name] = output
            if isinstance(output, torch.Tensor):
                versions[name] = output._version

        return hook

    modules = dict(model.named_modules())
    try:
        for name, module in modules.items():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        dummy = torch.zeros((1, *input_size), device=device)
        with torch.no_grad():
            model(dummy)
    finally:
        for handle in handles:
            handle.remove()

    height = int(input_size[-2])
    defaults = set(_stage_names(model))
    layers = []
    for name, index in sorted(order.items(), key=lambda item: item[1]):
        output = outputs[name]
        spatial, shape, reason = _describe_output(output)
        stride = None
        if spatial and shape is not None:
            ratio = height / shape[1]
            stride = float(round(ratio)) if abs(ratio - round(ratio)) < 1e-6 else ratio
        overwritten = isinstance(output, torch.Tensor) and output._version != versions.get(name, output._version)
        layers.append(
            LayerInfo(
                name=name,
                module_type=type(modules[name]).__name__,
                order=index,
                spatial=spatial,
                shape=shape,
                stride=stride,
                reason=reason,
                default=name in defaults,
                overwritten_in_place=overwritten,
            )
        )
    _mark_duplicates(layers, outputs)
    return layers


def _mark_duplicates(layers: list[LayerInfo], outputs: dict[str, object]) -> None:
    """Of modules returning the very same tensor, keep a default stage, else the one that ran last.

    A container returning its last child's output runs after it (the
    container is kept); an in-place activation runs after the module whose
    output it overwrote (the activation is kept, whose name tells the truth
    about the values).
    """
    by_identity: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        output = outputs[layer.name]
        if isinstance(output, torch.Tensor):
            by_identity.setdefault(id(output), []).append(layer)
    for group in by_identity.values():
        keeper = max(group, key=lambda layer: (layer.default, layer.order))
        for layer in group:
            if layer is not keeper and layer.spatial:
                layer.reason = f"same output tensor as {keeper.name}"


def _closest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.4)
    return f"; closest names: {', '.join(close)}" if close else "; alignscope layers MODEL lists them"


def select_layers(probed: list[LayerInfo], request: str | Sequence[str] | None = None) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """Resolve a layer request to (selected spatial layers, skipped layers with reasons).

    ``request``: ``None`` (timm stages from ``feature_info``; every spatial,
    de-duplicated module for models without one), ``"all"``, or exact module
    names and glob patterns such as ``"blocks.*"``. Selected layers come in
    execution order.
    """
    by_name = {layer.name: layer for layer in probed}
    distinct = [layer for layer in probed if layer.spatial and not layer.reason]
    if request is None:
        chosen = [layer for layer in probed if layer.default and layer.spatial] or distinct
        return chosen, []
    items = [request] if isinstance(request, str) else list(request)
    items = [part.strip() for item in items for part in item.split(",") if part.strip()]
    chosen: dict[str, LayerInfo] = {}
    skipped: dict[str, LayerInfo] = {}
    for item in items:
        if item == "all":
            chosen.update((layer.name, layer) for layer in distinct)
            skipped.update((layer.name, layer) for layer in probed if not layer.spatial)
        elif any(ch in item for ch in "*?["):
            matches = [layer for layer in probed if fnmatch.fnmatchcase(layer.name, item)]
            if not matches:
                raise LayerError(f"no module matches {item!r}{_closest(item, by_name)}")
            for layer in matches:
                if layer.spatial and not layer.reason:
                    chosen[layer.name] = layer
                elif not layer.spatial:
                    skipped[layer.name] = layer
        elif item in by_name:
            layer = by_name[item]
            if not layer.spatial:
                raise LayerError(f"layer {item!r} has no spatial output: {layer.reason}")
            chosen[item] = layer
        else:
            raise LayerError(f"unknown layer {item!r}{_closest(item, by_name)}")
    if not chosen:
        raise LayerError(f"no spatial layer selected by {', '.join(items)}; alignscope layers MODEL lists them")
    return sorted(chosen.values(), key=lambda layer: layer.order), sorted(skipped.values(), key=lambda layer: layer.order)


class _StopForward(Exception):
    """Raised by the last hook so that layers after the deepest one are not computed."""


class FeatureCapture:
    """Context manager capturing the outputs of ``layers`` for one batch at a time.

    >>> with FeatureCapture(model, layers) as capture:
    ...     maps = capture(batch)          # {layer name: (B, C, H, W) tensor}

    Outputs that a later in-place operation would overwrite (see
    :attr:`LayerInfo.overwritten_in_place`) are cloned when captured. With
    ``stop_early`` the forward pass ends once every layer has been captured.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo], stop_early: bool = True) -> None:
        self.model = model
        self.layers = list(layers)
        self.stop_early = stop_early
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FeatureCapture":
        modules = dict(self.model.named_modules())
        wanted = len(self.layers)
        for layer in self.layers:
            if layer.name not in modules:
                self.close()
                raise LayerError(f"unknown layer {layer.name!r}{_closest(layer.name, modules)}")

            def hook(module: nn.Module, inputs: object, output: object, layer: LayerInfo = layer) -> None:
                if not isinstance(output, torch.Tensor) or output.ndim != 4:
                    raise LayerError(f"layer {layer.name!r} did not return a 4-D tensor")
                self._captured[layer.name] = output.clone() if layer.overwritten_in_place else output
                if self.stop_early and len(self._captured) == wanted:
                    raise _StopForward

            self._handles.append(modules[layer.name].register_forward_hook(hook))
        return self

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        try:
            self.model(batch)
        except _StopForward:
            pass
        captured, self._captured = self._captured, {}
        missing = [layer.name for layer in self.layers if layer.name not in captured]
        if missing:
            raise LayerError(f"layers {missing} did not run in the forward pass")
        return captured

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
