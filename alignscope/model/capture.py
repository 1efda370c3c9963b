"""Forward hooks: which modules produce spatial feature maps, and capturing them.

:func:`probe_layers` runs the model on dummy inputs and records, for every
module (the root included; one entry per element of a list output), how its
output reads as a (B, C, H, W) map (its layout, decided by
:mod:`alignscope.model.layouts`), the map's shape, its stride relative to the input
and the order in which it ran. :func:`select_layers` turns a user's layer
request into probed layers and reports the default stages it drops.
:class:`FeatureCapture` attaches hooks to chosen modules, returns their
outputs for a batch already converted to (B, C, H, W), stops the forward pass
once the deepest chosen module has run (unless the model's own output is
wanted too, see :data:`MODEL_OUTPUT`), and removes every hook on exit, also
on error.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import logging
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import LayerError, UsageError, first_line
from .lattice import Lattice
from .layouts import NCHW, Layout, ModelHints, resolve_layout

log = logging.getLogger("alignscope")



@dataclass
class LayerInfo:
    """One module's output (or one element of a list output) as seen by the probe.

    ``shape`` is (C, H, W) for spatial maps, already in the (B, C, H, W)
    reading that :attr:`layout` gives; ``stride`` is input height divided by
    map height (not an integer for valid convolutions at sizes such as 299:
    translations then move the map by a fraction of a cell and are
    interpolated). ``order`` is the
    position in execution order (hooks fire when a module returns, so a
    container comes after its children). ``module_name`` is the hooked module
    and ``element`` the index into its list/tuple output (``name`` is then
    ``"module[i]"``).
    ``lattice``: where its cells sit on the input, once measured
    (:func:`alignscope.model.lattice_probe.attach_lattices`).
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
    layout: Layout = NCHW
    module_name: str | None = None
    element: int | None = None
    lattice: Lattice | None = None

    @property
    def channels(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    @property
    def source(self) -> str:
        """The name of the module whose forward hook captures this layer."""
        return self.name if self.module_name is None else self.module_name

    def select(self, output: object) -> object:
        """This layer's tensor in its module's output (the element of a list output)."""
        return output if self.element is None else output[self.element]  # type: ignore[index]


def _stage_entries(model: nn.Module) -> list[dict]:
    """timm's ``feature_info`` stages as dicts with ``module`` (and ``reduction``), if the model has them."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "module_name"):  # timm FeatureInfo object (features_only models)
        return [{"module": m, "reduction": r, "num_chs": c} for m, r, c in zip(info.module_name(), info.reduction(), info.channels())]
    try:
        return [dict(entry) for entry in info if "module" in entry]
    except (TypeError, KeyError, ValueError):
        return []


def _stage_names(model: nn.Module) -> list[str]:
    """Module names of the model's stages from timm's ``feature_info``, if it has one."""
    return [entry["module"] for entry in _stage_entries(model)]


PROBE_BATCH = 2  # more than one, so that a leading dimension of windows x batch cannot pass for the batch
RESIZE_PROBE_STEP = 64  # the second probe adds this many pixels to height and width


def _run_hooked(model: nn.Module, modules: dict[str, nn.Module], dummy: torch.Tensor, tolerate: bool = False,
                shapes_only: bool = False):
    """Run ``model`` on ``dummy`` with a hook on every module (the root included); remove them all after.

    Returns {name: output}, {name: output version at return}, {name: order},
    {name: number of calls} and the first line of the error if ``tolerate``
    and the forward failed. A module called more than once keeps its last
    output and the position of its last call.
    ``shapes_only`` keeps each tensor's shape instead of the tensor (an empty
    meta tensor of that shape), so that the probe holds one set of outputs.
    """
    outputs: dict[str, object] = {}
    versions: dict[str, object] = {}
    order: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            order[name] = sum(calls.values()) - 1
            outputs[name] = _shapes(output) if shapes_only else output
            versions[name] = _versions(output)

        return hook

    failure = ""
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            try:
                model(dummy)
            except Exception as exc:
                if not tolerate:
                    raise
                failure = first_line(exc, 120)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, versions, order, calls, failure


def _shapes(output: object) -> object:
    if isinstance(output, torch.Tensor):
        return torch.empty(output.shape, device="meta")
    if isinstance(output, (list, tuple)):
        return [_shapes(t) for t in output]
    return output


def _versions(output: object) -> object:
    if isinstance(output, torch.Tensor):
        return output._version
    if isinstance(output, (list, tuple)):
        return [t._version if isinstance(t, torch.Tensor) else None for t in output]
    return None


def _elements(name: str, output: object) -> list[tuple[str, int | None, object]]:
    """(layer name, element index, value) for a module's output: itself, or each element of a list/tuple."""
    if isinstance(output, (list, tuple)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return [(f"{name}[{i}]", i, t) for i, t in enumerate(output)]
    return [(name, None, output)]


def probe_layers(model: nn.Module, input_size: Sequence[int], device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Run ``model`` on zero batches of ``input_size`` (C, H, W) and describe every module's output.

    Each output's layout is resolved by :func:`~alignscope.model.layouts.resolve_layout`
    from a batch of :data:`PROBE_BATCH` at the model's input size and, where
    the model accepts it, a second probe :data:`RESIZE_PROBE_STEP` pixels
    larger. List/tuple outputs become one layer per element (``name[i]``);
    the root module (name ``""``) is probed too.
    """
    modules = dict(model.named_modules())
    channels, height, width = (int(v) for v in input_size[-3:])
    try:
        outputs, versions, order, calls, _ = _run_hooked(model, modules, torch.zeros((PROBE_BATCH, channels, height, width),
                                                                                    device=device))
    except (AssertionError, RuntimeError, ValueError) as exc:  # the model's own check of its input, most often
        raise UsageError(f"the model refuses a {channels}x{height}x{width} input ({first_line(exc)}); pass the input size it was "
                         "built for (--input-size, input_size=)") from exc
    resized, _, _, _, _ = _run_hooked(
        model, modules, torch.zeros((PROBE_BATCH, channels, height + RESIZE_PROBE_STEP, width + RESIZE_PROBE_STEP), device=device),
        tolerate=True, shapes_only=True)

    entries = _stage_entries(model)
    defaults = {entry["module"] for entry in entries}
    stage_of = {entry["module"]: entry for entry in entries}
    hints = ModelHints.from_model(model, (height, width), PROBE_BATCH, sorted(defaults),
                                  {entry["module"]: entry.get("num_chs") for entry in entries})
    layers = []
    identities: dict[str, int] = {}
    for name, index in sorted(order.items(), key=lambda item: item[1]):
        output = outputs[name]
        elements = _elements(name, output)
        resized_elements = dict((n, v) for n, _, v in _elements(name, resized.get(name)))
        for layer_name, element, value in elements:
            layer = LayerInfo(name=layer_name, module_type=type(modules[name]).__name__, order=index, spatial=False,
                              module_name=None if element is None else name, element=element)
            if isinstance(value, torch.Tensor):
                other = resized_elements.get(layer_name)
                found = resolve_layout(value, hints, tuple(other.shape) if isinstance(other, torch.Tensor) else None,
                                       modules[name], name)
                layer.spatial, layer.shape, layer.reason = found.spatial, found.shape, found.reason
                if calls[name] > 1:
                    # a shared module (one activation or dropout used at several places): which call is meant?
                    layer.spatial, layer.reason = False, f"runs {calls[name]} times in one forward pass, so its output is ambiguous"
                if found.layout is not None:
                    layer.layout = found.layout
                    layer.stride = _stride(height, found.shape[1])
                before = versions[name] if element is None else versions[name][element]
                layer.overwritten_in_place = value._version != before
                identities[layer_name] = id(value)
            else:
                layer.reason = f"output is a {type(value).__name__}, not a tensor"
            layer.default = name in defaults and element is None
            layers.append(layer)
        if name in defaults and elements[0][1] is not None:
            _mark_list_stage([layer for layer in layers if layer.module_name == name], stage_of[name])
    _mark_duplicates(layers, identities)
    probed = {layer.source for layer in layers}
    for extra, stage in enumerate(entry["module"] for entry in entries if entry["module"] not in probed):
        reason = ("no module of this name in the model (timm names it in its features_only wrapper only)"
                  if stage not in modules else "the module did not run in the forward pass")
        layers.append(LayerInfo(name=stage, module_type="-", order=len(order) + extra, spatial=False, reason=reason, default=True))
    return layers


def _stride(height: int, map_height: int) -> float:
    ratio = height / map_height
    return float(round(ratio)) if abs(ratio - round(ratio)) < 1e-6 else ratio


def _mark_list_stage(group: list[LayerInfo], stage: dict) -> None:
    """Which elements of a list-output stage stand for it: those with its reduction (and channel count, if
    that narrows it down); every element when none has its reduction."""
    reduction, channels = stage.get("reduction"), stage.get("num_chs")
    picked = [layer for layer in group if layer.spatial and isinstance(reduction, (int, float))
              and layer.stride is not None and round(layer.stride) == round(float(reduction))]
    narrowed = [layer for layer in picked if layer.channels == channels]
    for layer in (narrowed or picked or group):
        layer.default = True


def _mark_duplicates(layers: list[LayerInfo], identities: dict[str, int]) -> None:
    """Of layers holding the very same tensor, keep a default stage, else a map, else the one that ran last.

    A container returning its last child's output runs after it (the
    container is kept); an in-place activation runs after the module whose
    output it overwrote (the activation is kept, whose name tells the truth
    about the values). The root module is kept only when nothing else holds
    its output.
    """
    by_identity: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        if layer.name in identities:
            by_identity.setdefault(identities[layer.name], []).append(layer)
    for group in by_identity.values():
        keeper = max(group, key=lambda layer: (layer.default, layer.spatial, layer.name != "", layer.order))
        for layer in group:
            if layer is not keeper and layer.spatial:
                layer.reason = f"same output tensor as {keeper.name or 'the root module'}"


def _closest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.4)
    return f"; closest names: {', '.join(close)}" if close else "; alignscope layers MODEL lists them"


FALLBACK_CAP = 16  # at most this many layers when a model's stages give no map


def _spread(layers: list[LayerInfo], count: int) -> list[LayerInfo]:
    """``count`` layers evenly spread over ``layers`` (first and last included)."""
    if len(layers) <= count:
        return list(layers)
    picks = sorted({round(i * (len(layers) - 1) / (count - 1)) for i in range(count)})
    return [layers[i] for i in picks]


def stage_ends(layers: list[LayerInfo]) -> list[LayerInfo]:
    """The last module of each run of equal stride, in execution order: where a model without ``feature_info``
    ends a stage before it downsamples (torchvision's resnet18: relu, layer1 ... layer4). ``[]`` when the
    stride never changes (no stages to tell apart)."""
    runs: list[LayerInfo] = []
    for layer in layers:
        if runs and runs[-1].stride == layer.stride:
            runs[-1] = layer
        else:
            runs.append(layer)
    return runs if len(runs) > 1 else []


def default_layer_rule(probed: list[LayerInfo]) -> str:
    """How the default layers of this model are chosen, for run.json."""
    if any(layer.default and layer.spatial and not layer.reason for layer in probed):
        return "feature_info stages"
    distinct = [layer for layer in probed if layer.spatial and not layer.reason]
    if stage_ends(distinct):
        return "stage ends: the last module before each change of stride (no feature_info)"
    return f"at most {FALLBACK_CAP} spatial modules, evenly spread (no feature_info, no change of stride)"


def _default_layers(probed: list[LayerInfo], distinct: list[LayerInfo]) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """The model's stages that give maps; every dropped stage and a fallback are logged and returned as skipped."""
    stages = [layer for layer in probed if layer.default]
    chosen = [layer for layer in stages if layer.spatial and not layer.reason]
    dropped = [layer for layer in stages if layer not in chosen]
    for layer in dropped:
        log.warning("default stage %r dropped: %s", layer.name, layer.reason or "no spatial output")
    if chosen:
        return chosen, dropped
    ends = stage_ends(distinct)
    if ends:  # stages where the model has no feature_info: the last module before each downsampling
        picked = _spread(ends, FALLBACK_CAP)
        log.info("the model has no feature_info stages%s; using its %d stage ends (the last module before each "
                 "change of stride): %s", " that give maps" if stages else "", len(picked),
                 ", ".join(layer.name for layer in picked[:8]) + (" ..." if len(picked) > 8 else ""))
        return picked, dropped
    picked = _spread(distinct, FALLBACK_CAP)
    left = [replace(layer, reason=f"left out of the fallback, capped at {FALLBACK_CAP} evenly spread layers")
            for layer in distinct if layer not in picked]
    if stages:
        log.warning("none of the model's %d feature_info stages gives a map; falling back to %d of its %d spatial "
                    "modules%s (--layers all takes every one)", len(stages), len(picked), len(distinct),
                    ", evenly spread" if left else "")
    elif left:
        log.warning("the model has no feature_info stages; using %d of its %d spatial modules, evenly spread "
                    "(--layers all takes every one)", len(picked), len(distinct))
    return picked, dropped + left


def select_layers(probed: list[LayerInfo], request: str | Sequence[str] | None = None) -> tuple[list[LayerInfo], list[LayerInfo]]:
    """Resolve a layer request to (selected spatial layers, skipped layers with reasons).

    ``request``: ``None`` (timm stages from ``feature_info`` that give maps;
    every dropped stage is logged and returned as skipped; when none gives a
    map, and for models without ``feature_info``, at most
    :data:`FALLBACK_CAP` distinct spatial modules, evenly spread), ``"all"``,
    or exact module names and glob patterns such as ``"blocks.*"``. The
    name of a module with a list output selects all its elements
    (``name[0]``, ...). Selected layers come in execution order.
    """
    chosen, skipped = _select(probed, request)
    _note_fractional_strides(chosen)
    return chosen, skipped


def _note_fractional_strides(layers: list[LayerInfo]) -> None:
    fractional = [layer for layer in layers if layer.stride is not None and layer.stride != round(layer.stride)]
    if fractional:
        shown = ", ".join(f"{layer.name} ({layer.stride:.3f})" for layer in fractional[:4])
        more = f" and {len(fractional) - 4} more" if len(fractional) > 4 else ""
        log.info("fractional strides at %s%s (input height / map height): a translation there moves the map by a "
                 "fraction of a cell and is interpolated, not exact; flips and quarter turns stay index operations",
                 shown, more)


def _select(probed: list[LayerInfo], request: str | Sequence[str] | None) -> tuple[list[LayerInfo], list[LayerInfo]]:
    by_name = {layer.name: layer for layer in probed}
    distinct = [layer for layer in probed if layer.spatial and not layer.reason]
    if request is None:
        return _default_layers(probed, distinct)
    items = [request] if isinstance(request, str) else list(request)
    items = [part.strip() for item in items for part in item.split(",") if part.strip()]
    chosen: dict[str, LayerInfo] = {}
    skipped: dict[str, LayerInfo] = {}
    for item in items:
        elements = [layer for layer in probed if layer.module_name == item]
        if item == "all":
            chosen.update((layer.name, layer) for layer in distinct)
            skipped.update((layer.name, layer) for layer in probed if not layer.spatial)
        elif any(ch in item for ch in "*?[") and item not in by_name:
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
        elif elements:
            maps = [layer for layer in elements if layer.spatial]
            if not maps:
                raise LayerError(f"no element of {item!r}'s list output is a spatial map: {elements[0].reason}")
            chosen.update((layer.name, layer) for layer in maps)
            skipped.update((layer.name, layer) for layer in elements if not layer.spatial)
        else:
            raise LayerError(f"unknown layer {item!r}{_closest(item, by_name)}")
    if not chosen:
        raise LayerError(f"no spatial layer selected by {', '.join(items)}; alignscope layers MODEL lists them")
    return sorted(chosen.values(), key=lambda layer: layer.order), sorted(skipped.values(), key=lambda layer: layer.order)


MODEL_OUTPUT = "<model output>"  # key of the model's (B, K) output in a capture; no module name has this form


class _StopForward(Exception):
    """Raised by the last hook so that layers after the deepest one are not computed."""


class ForwardHooks:
    """Forward hooks owned by one object: removed by :meth:`close`, also when its ``with`` block ends."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FeatureCapture(ForwardHooks):
    """Context manager capturing the outputs of ``layers`` for one batch at a time.

    >>> with FeatureCapture(model, layers) as capture:
    ...     maps = capture(batch)          # {layer name: (B, C, H, W) tensor}

    Each output is turned into (B, C, H, W) where it is captured, with the
    layer's :class:`~alignscope.model.layouts.Layout` (channels-last maps are
    permuted, token grids reshaped with their prefix tokens left out), and
    checked against the probed (C, H, W) and the batch size. Outputs that a
    later in-place operation would overwrite (see
    :attr:`LayerInfo.overwritten_in_place`) are cloned when captured. With
    ``stop_early`` the forward pass ends once every layer has been captured.
    ``output_classes`` = K: the model's own output, checked to be a (B, K)
    tensor, is returned too, under :data:`MODEL_OUTPUT`; the forward pass then
    always runs to the end.
    ``input_hw`` (H, W): the batch has another size than the probed one (the
    lattice probe); each layer is read with its layout at that size (token
    grids factored anew) and checked on its channel count only. ``keep``:
    ``keep(layer, map)`` is returned instead of the whole (B, C, H, W) map,
    so that a probe holds only the cells it reads.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo], stop_early: bool = True,
                 output_classes: int | None = None, input_hw: tuple[int, int] | None = None,
                 keep: Callable[[LayerInfo, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.layers = list(layers)
        self.input_hw = input_hw
        self.keep = keep
        self.output_classes = output_classes
        self.stop_early = stop_early and output_classes is None
        self._stop_early_asked = stop_early
        super().__init__()
        self._captured: dict[str, torch.Tensor] = {}
        self._only: set[str] | None = None  # see restricted()
        self._batch = 0

    def _take(self, layer: LayerInfo, output: object) -> torch.Tensor:
        value = layer.select(output) if isinstance(output, (list, tuple)) or layer.element is None else None
        if not isinstance(value, torch.Tensor):
            raise LayerError(f"layer {layer.name!r} did not return a tensor this time (got {type(value).__name__})")
        if value.shape[0] != self._batch:
            raise LayerError(f"layer {layer.name!r} returned a leading dimension of {value.shape[0]} for a batch of "
                             f"{self._batch}; it is not a per-image map")
        if self.input_hw is None:
            converted = layer.layout.to_nchw(value)
            if converted.ndim != 4 or tuple(converted.shape[1:]) != tuple(layer.shape or ()):
                raise LayerError(f"layer {layer.name!r} read as {layer.layout} gives {tuple(converted.shape[1:])}, "
                                 f"but the probe saw {layer.shape}; pass images of the model's input size")
        else:  # another input size (the lattice probe): the same reading, a map of another size
            try:
                converted = layer.layout.at_input(value, self.input_hw).to_nchw(value)
            except (ValueError, RuntimeError) as exc:
                raise LayerError(f"layer {layer.name!r} gives no {layer.layout.kind} map at a {self.input_hw[0]} x "
                                 f"{self.input_hw[1]} input: {exc}") from None
            if converted.ndim != 4 or converted.shape[1] != layer.channels:
                raise LayerError(f"layer {layer.name!r} read as {layer.layout} gives {tuple(converted.shape[1:])} at a "
                                 f"{self.input_hw[0]} x {self.input_hw[1]} input, not {layer.channels} channels")
        if self.keep is not None:
            return self.keep(layer, converted)  # a reduction is a new tensor: later in-place ops cannot reach it
        return converted.clone() if layer.overwritten_in_place else converted

    def __enter__(self) -> "FeatureCapture":
        modules = dict(self.model.named_modules())
        wanted = len(self.layers)
        by_module: dict[str, list[LayerInfo]] = {}
        for layer in self.layers:
            if layer.source not in modules:
                self.close()
                raise LayerError(f"unknown layer {layer.name!r}{_closest(layer.name, modules)}")
            by_module.setdefault(layer.source, []).append(layer)
        for source, group in by_module.items():

            def hook(module: nn.Module, inputs: object, output: object, group: list[LayerInfo] = group) -> None:
                for layer in group:
                    if self._only is None or layer.name in self._only:
                        self._captured[layer.name] = self._take(layer, output)
                if self.stop_early and len(self._captured) == (wanted if self._only is None else len(self._only)):
                    raise _StopForward

            self._handles.append(modules[source].register_forward_hook(hook))
        return self

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        self._batch = int(batch.shape[0])
        result = None
        try:
            result = self.model(batch)
        except _StopForward:
            pass
        captured, self._captured = self._captured, {}
        missing = [layer.name for layer in self.layers if layer.name not in captured
                   and (self._only is None or layer.name in self._only)]
        if missing:
            raise LayerError(f"layers {missing} did not run in the forward pass")
        if self.output_classes is not None:
            expected = (self._batch, self.output_classes)
            if not isinstance(result, torch.Tensor) or tuple(result.shape) != expected:
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise LayerError(f"the model's output is {got}, but the probe saw class scores of shape (batch, "
                                 f"{self.output_classes}); pass images of the model's input size or analyze with output=False")
            captured[MODEL_OUTPUT] = result
        return captured

    @contextlib.contextmanager
    def layers_only(self) -> Iterator["FeatureCapture"]:
        """Within this block the model's output is not returned, so a forward pass may stop after the last layer."""
        saved = self.output_classes, self.stop_early
        self.output_classes, self.stop_early = None, self._stop_early_asked
        try:
            yield self
        finally:
            self.output_classes, self.stop_early = saved

    @contextlib.contextmanager
    def restricted(self, names: set[str]) -> Iterator["FeatureCapture"]:
        """Within this block only the layers ``names`` are captured, and the forward pass stops after them."""
        saved = self._only
        with self.layers_only():
            self._only = set(names)
            try:
                yield self
            finally:
                self._only = saved

    @contextlib.contextmanager
    def output_only(self) -> Iterator["FeatureCapture"]:
        """Within this block no layer is captured and the model's output is returned (the forward pass runs to the end)."""
        if self.output_classes is None:
            raise LayerError("this capture returns no model output (the model has no classifier head, or output=False)")
        saved = self._only
        self._only = set()
        try:
            yield self
        finally:
            self._only = saved
