"""Measuring sampling lattices: where a layer's cells sit on the input image (the frame: :mod:`.lattice`).

How it is measured
------------------
Not from module types: :func:`measure_lattices` back-propagates single cells
to a random probe input and reads the support of each gradient (the pixels
that influence the cell), through the same :class:`~alignscope.model.capture.FeatureCapture`
reader as the analysis (list elements, channels-last maps, token grids).
Along each axis, the first two cells' supports end at ``stride * j + offset
+ reach`` (their starts are cut by the image's edge) and the last two cells'
supports start at ``stride * j + offset - reach``: the step between
neighbours is the stride, and the midpoint of the two ends is the cell
centre. Reading each end where the other is cut lets a probe of about
``reach + 2 * stride`` pixels measure a layer, half of what an interior cell
would need.

Cost is bounded: each axis is probed with an input long along it and thin
across it (where the model accepts that), four batch items per layer (one
cell each, batch items are independent in eval mode), many layers per
backward pass, each graph freed before the next, and only the cells read are
kept. The long side starts at the model's input size and doubles while an end
is cut, up to :data:`MAX_PROBE_SIZE`; every probe size equals the model's
modulo the least common multiple of the layers' strides, because "SAME"
padding depends on the input size modulo the stride.

Global layers (attention over the whole image) are found first, without
gradients: a layer whose first cell changes when the probe's far end is
re-drawn, and whose last cell changes with its near end, sees the whole probe;
one that does so at two sizes (2 and 4 times the input's) has no lattice. A
model that refuses other input sizes (Swin, MaxViT, ViT without dynamic size)
is probed at its own size only, where such a layer gets no lattice at once.
Either way the reason is returned, never an exception.

Supports are read as non-zero gradients, so float32's range matters: the
backward pass is seeded with 2**100, and a support whose weakest pixel is
below :data:`TAIL_GUARD` of its strongest (or below :data:`UNDERFLOW_GUARD`
outright) may have lost pixels at its tails, unevenly between cells; such a
layer gets no lattice, with that reason, rather than a wrong centre.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import LayerError, first_line
from .capture import FeatureCapture, LayerInfo
from .lattice import Lattice

MAX_PROBE_SIZE = 2048
PROBE_ITEMS_PER_LAYER = 4  # cells 1 and 2 (their supports' ends) and the last-but-two and last-but-one (starts)
PROBE_PIXEL_BUDGET = 16  # at most this many input-sized images' pixels per backward pass
GLOBAL_SIZES = (2, 4)
GRADIENT_SEEDS = (2.0**100, 2.0**40, 1.0)  # the backward pass's seed, smaller after an overflow (see _ends)
UNDERFLOW_GUARD = 1e-30  # a gradient this small may have lost neighbours to float32 underflow (smallest normal 1.2e-38)
TAIL_GUARD = 1e-28  # a support whose weakest pixel is this far below its strongest has tails float32 cannot resolve
_CACHE_SIZE = 16
# measurements by (model fingerprint, input size, layers): one process often analyzes the same model again
_cache: dict[tuple, dict[str, "Lattice | str"]] = {}


_AxisLattice = tuple[float, float, tuple[float, float]]  # stride, offset, reach (before, after)
_Keep = Callable[[LayerInfo, torch.Tensor], torch.Tensor]


def _congruent(size: int, period: int, at_least: int) -> int:
    """The smallest size >= ``at_least`` (and >= 1) congruent to ``size`` modulo ``period``."""
    remainder = size % period
    return remainder + period * max(0, math.ceil((max(at_least, 1) - remainder) / period))


def _lattice_stride_guess(stride: float) -> int:
    """The integer stride of a layer's lattice, from input size / map size.

    An integer ratio is the stride; a fractional one (valid convolutions:
    299 / 35) comes from a lattice whose stride is the nearest power of two,
    which is what the probe sizes must respect (the ratio rounded would make
    their least common multiple, and so the probes, needlessly large).
    """
    if abs(stride - round(stride)) < 1e-6:
        return max(1, int(round(stride)))
    return 2 ** max(0, round(math.log2(stride)))


@dataclass
class _AxisProbe:
    """Probes along one axis (``axis`` -1: x, -2: y) of ``model``: long along it, ``across`` pixels across."""

    model: nn.Module
    channels: int
    native: tuple[int, int]  # the model's input (H, W)
    axis: int
    period: int
    across: int
    generator: torch.Generator
    device: str | torch.device

    @property
    def along_native(self) -> int:
        return self.native[1] if self.axis == -1 else self.native[0]

    def hw(self, size: int) -> tuple[int, int]:
        return (self.across, size) if self.axis == -1 else (size, self.across)

    def noise(self, batch: int, size: int) -> torch.Tensor:
        return torch.randn(batch, self.channels, *self.hw(size), generator=self.generator).to(self.device)

    def line(self, layer: LayerInfo, maps: torch.Tensor) -> torch.Tensor:
        """The (B, C, cells) line of ``maps`` along the axis, through the middle of the other axis."""
        return maps[:, :, maps.shape[2] // 2, :] if self.axis == -1 else maps[:, :, :, maps.shape[3] // 2]

    def run(self, layers: Sequence[LayerInfo], x: torch.Tensor, keep: _Keep) -> dict[str, torch.Tensor] | str:
        """``keep(layer, map)`` per layer for the batch ``x``, or why the model (or the reader) refused ``x``."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        try:
            with FeatureCapture(self.model, layers, input_hw=None if hw == self.native else hw, keep=keep) as capture:
                return capture(x)
        except LayerError as exc:
            return str(exc)
        except Exception as exc:  # the model's own refusal: an assert on the input size, a shape mismatch
            return first_line(exc)


def _choose_across(model: nn.Module, layers: Sequence[LayerInfo], channels: int, native: tuple[int, int], axis: int,
                   period: int, generator: torch.Generator, device: str | torch.device) -> int:
    """The thinnest side across the probe that the model accepts with a cell in every layer, else the input's.

    Tried from two cells of the deepest layer upwards, one stride of it at a
    time (valid convolutions need more than two); each try is one forward
    pass of one image.
    """
    native_across = native[0] if axis == -1 else native[1]
    across = _congruent(native_across, period, max(2 * period, 32))
    while across < native_across:
        probe = _AxisProbe(model, channels, native, axis, period, across, generator, device)
        with torch.no_grad():
            sizes = probe.run(layers, probe.noise(1, probe.along_native), lambda layer, maps: torch.tensor(maps.shape[2:]))
        if not isinstance(sizes, str) and all(int(hw.min()) >= 1 for hw in sizes.values()):
            return across
        across += period
    return native_across


def _sees_whole(probe: _AxisProbe, layers: Sequence[LayerInfo], size: int) -> dict[str, tuple[bool, int]] | str:
    """Per layer: do its first cell depend on the probe's far end and its last cell on the near end? And its cell count.

    One forward pass without gradients: a random probe, the same with its
    last columns (rows) re-drawn, and with its first ones re-drawn.
    """
    width = max(1, min(max(probe.period, 8), size // 4))
    base = probe.noise(1, size)
    far, near = base.clone(), base.clone()
    end = [slice(None)] * 4
    end[probe.axis] = slice(size - width, size)
    far[tuple(end)] = probe.noise(1, size)[tuple(end)]
    end[probe.axis] = slice(0, width)
    near[tuple(end)] = probe.noise(1, size)[tuple(end)]
    with torch.no_grad():
        ends_count: dict[str, int] = {}

        def keep(layer: LayerInfo, maps: torch.Tensor) -> torch.Tensor:
            line = probe.line(layer, maps)
            ends_count[layer.name] = int(line.shape[-1])
            return line[..., [0, -1]].float()

        ends = probe.run(layers, torch.cat([base, far, near]), keep)
    if isinstance(ends, str):
        return ends
    seen = {}
    for layer in layers:
        value = ends[layer.name]
        scale = float(value[0].abs().max()) + 1e-30
        first_sees_far = float((value[1, :, 0] - value[0, :, 0]).abs().max()) > 1e-6 * scale
        last_sees_near = float((value[2, :, 1] - value[0, :, 1]).abs().max()) > 1e-6 * scale
        seen[layer.name] = (first_sees_far and last_sees_near, ends_count[layer.name])
    return seen


def _influence(grad: torch.Tensor) -> torch.Tensor:
    """(H, W) influence of each pixel on a cell, from its (C, H, W) gradient."""
    return grad.abs().sum(dim=0)


def _support(influence: torch.Tensor, axis: int) -> tuple[int, int] | None:
    """(first, last) index along ``axis`` (-1: columns, -2: rows) of the pixels with influence."""
    hit = influence > 0
    line = hit.any(dim=-2 if axis == -1 else -1)
    where = torch.nonzero(line).flatten()
    return (int(where[0]), int(where[-1])) if where.numel() else None


def _ends(probe: _AxisProbe, chunk: Sequence[LayerInfo], size: int, strides: dict[str, float],
          seed: float = GRADIENT_SEEDS[0]) -> dict[str, _AxisLattice | str | None]:
    """One forward and one backward pass for the layers of ``chunk`` at probe length ``size``.

    Items 4l .. 4l + 3 belong to layer l: cells 1 and 2 (whose supports'
    ends are read) and the last-but-two and last-but-one (whose starts are).
    ``None`` where an end is cut by the probe's border (a longer probe is needed).
    """
    items = PROBE_ITEMS_PER_LAYER * len(chunk)
    x = probe.noise(items, size).requires_grad_(True)
    weights = torch.randn(max(layer.channels for layer in chunk), generator=probe.generator).to(probe.device)
    found: dict[str, _AxisLattice | str | None] = {}
    with torch.enable_grad():
        lines = probe.run(chunk, x, probe.line)
        if isinstance(lines, str):
            return {layer.name: f"the probe failed at {size} px: {lines}" for layer in chunk}
        target = x.new_zeros(())
        cells_of = {}
        for index, layer in enumerate(chunk):
            line = lines[layer.name]
            count = line.shape[-1]
            if count < 4:
                found[layer.name] = None
                continue
            cells_of[layer.name] = cells = (1, 2, count - 3, count - 2)
            for item, cell in enumerate(cells):
                target = target + (line[PROBE_ITEMS_PER_LAYER * index + item, :, cell] * weights[: line.shape[1]]).sum()
        del lines
        grad = None
        if target.requires_grad:
            # seeded with a large power of two rather than 1: supports are read as non-zero gradients, and the tails
            # of a deep support (products of many small weights, such as residual branches' layer scale of 1e-6 at
            # random initialisation) would underflow float32 and cut the support short, unevenly between cells
            grad = torch.autograd.grad(target, x, grad_outputs=torch.full_like(target, seed), allow_unused=True)[0]
    if grad is not None and not bool(torch.isfinite(grad).all()):
        smaller = [s for s in GRADIENT_SEEDS if s < seed]
        if smaller:
            return _ends(probe, chunk, size, strides, smaller[0])
        return {layer.name: "the probe's gradient is not finite" for layer in chunk}
    for index, layer in enumerate(chunk):
        if layer.name not in cells_of:
            continue
        if grad is None:
            found[layer.name] = "the layer's output does not depend on the input"
            continue
        first = PROBE_ITEMS_PER_LAYER * index
        influence = [_influence(grad[first + item]) for item in range(PROBE_ITEMS_PER_LAYER)]
        kept = torch.cat([values[values > 0] for values in influence])
        if kept.numel():
            smallest, relative = float(kept.min()), float(kept.min().double() / kept.max().double())
            if smallest < UNDERFLOW_GUARD or relative < TAIL_GUARD:
                found[layer.name] = (f"its support's tails are below float32's range (influence down to {relative:.0e} of "
                                     "the largest: paths through weights near zero, such as a random layer scale or an "
                                     "attention mask), so its extent and centre cannot be measured")
                continue
        supports = [_support(values, probe.axis) for values in influence]
        found[layer.name] = _axis_lattice(supports, cells_of[layer.name], size, strides.get(layer.name))
    return found


def _axis_lattice(supports: list[tuple[int, int] | None], cells: tuple[int, ...], size: int,
                  known: float | None = None) -> _AxisLattice | str | None:
    """Stride, offset and reach from the ends of cells 1 and 2 and the starts of the last two (``cells``).

    ``known``: the lattice's stride where it is known without gradients (the
    cell counts at two probe sizes, or an integer input / map ratio). A
    support can only come out short, never long (float32 underflow, or a
    ReLU that is off at its edge for this probe), so the farthest end and the
    earliest start win, and each neighbour's step must be within half a
    stride of the stride (window attention, whose cells share supports, is
    no lattice). Without a known stride the two steps must agree.
    """
    if any(support is None for support in supports):
        return "zero gradient at a probe cell (no support to measure)"
    (_, end1), (_, end2), (start3, _), (start4, _) = supports  # type: ignore[misc]
    if end2 >= size - 1 or start3 <= 0:
        return None
    step_ends, step_starts = end2 - end1, start4 - start3
    stride = float(step_ends) if known is None else known
    if (known is None and step_ends != step_starts) or (
            known is not None and max(abs(step_ends - stride), abs(step_starts - stride)) > stride / 2):
        return (f"neighbouring cells' supports are {step_ends} px apart at the probe's start and {step_starts} px at "
                f"its end{'' if known is None else f' (stride {known:g})'}; not one lattice")
    if stride <= 0:
        return f"neighbouring cells' supports are not ordered (stride {stride:g}); not a lattice"
    after = max(end1 - stride * cells[0], end2 - stride * cells[1])  # offset + reach after the centre
    before = min(start3 - stride * cells[2], start4 - stride * cells[3])  # offset - reach before it
    if after < before:
        return "a cell's support ends before it starts; not a lattice"
    return stride, (after + before) / 2, ((after - before) / 2, (after - before) / 2)


def _chunks(layers: Sequence[LayerInfo], probe: _AxisProbe, size: int) -> list[list[LayerInfo]]:
    """Layers in execution order, as many per backward pass as :data:`PROBE_PIXEL_BUDGET` allows."""
    height, width = probe.hw(size)
    budget = PROBE_PIXEL_BUDGET * probe.native[0] * probe.native[1]
    per_pass = max(1, budget // (PROBE_ITEMS_PER_LAYER * height * width))
    ordered = sorted(layers, key=lambda layer: layer.order)
    return [ordered[i:i + per_pass] for i in range(0, len(ordered), per_pass)]


def _probe_axis(probe: _AxisProbe, layers: Sequence[LayerInfo], max_size: int) -> dict[str, _AxisLattice | str]:
    """Measure one axis: global layers first (no gradients), then the ends of the rest, doubling the probe."""
    native = probe.along_native
    name = "x" if probe.axis == -1 else "y"
    results: dict[str, _AxisLattice | str] = {}
    larger = [_congruent(native, probe.period, factor * native) for factor in GLOBAL_SIZES]
    refused = ""
    whole: dict[str, bool] = {layer.name: True for layer in layers}
    counts: dict[str, list[int]] = {layer.name: [] for layer in layers}
    for size in larger:
        seen = _sees_whole(probe, layers, size)
        if isinstance(seen, str):
            refused = seen
            break
        for key, (sees, count) in seen.items():
            whole[key] = whole[key] and sees
            counts[key].append(count)
    # the stride from the cell counts at two sizes (exact, since the sizes differ by a multiple of every stride)
    strides = {key: (larger[1] - larger[0]) / (found[1] - found[0]) for key, found in counts.items()
               if len(found) == 2 and found[1] > found[0]}
    for layer in layers:  # a model of one size: an integer input / map ratio is the stride
        ratio = float(layer.stride or 0)
        if layer.name not in strides and ratio >= 1 and abs(ratio - round(ratio)) < 1e-6:
            strides[layer.name] = float(round(ratio))
    if refused:  # a model of one input size: probed at that size only
        seen = _sees_whole(probe, layers, native)
        if isinstance(seen, str):
            return {layer.name: f"the probe at the model's own size failed: {seen}" for layer in layers}
        for layer in layers:
            if seen[layer.name][0]:
                results[layer.name] = (f"every cell depends on the whole input along {name} at the model's only input "
                                       f"size ({native} px): attention or squeeze-excitation over the image, or a "
                                       "receptive field wider than the input")
    else:
        for layer in layers:
            if whole[layer.name]:
                results[layer.name] = (f"global: every cell depends on the whole probe along {name} at {larger[0]} and "
                                       f"{larger[-1]} px (attention or squeeze-excitation over the image, or a receptive "
                                       f"field wider than {larger[-1]} px)")
    pending = [layer for layer in layers if layer.name not in results]
    size = native
    while pending:
        if size > max_size:
            results.update((layer.name, f"the layer's support reaches past a {max_size} px probe") for layer in pending)
            break
        cut = []
        for chunk in _chunks(pending, probe, size):
            found = _ends(probe, chunk, size, strides)
            for layer in chunk:
                if found[layer.name] is None:
                    cut.append(layer)
                else:
                    results[layer.name] = found[layer.name]  # type: ignore[assignment]
        pending = cut
        if pending and refused:
            results.update((layer.name, f"its support reaches past the model's own input size ({native} px along "
                                        f"{name}), and the model refuses larger probes ({refused})") for layer in pending)
            break
        size = _congruent(native, probe.period, 2 * size)
    return results


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters need no gradient during the probe (the input does); their flags are restored after."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

def _fingerprint(model: nn.Module) -> tuple:
    """Architecture and weights, cheaply.

    Every module's class (the object itself: two classes of one name differ)
    and settings (padding, stride), and per tensor its sums and non-zero
    count: the support of a gradient depends on which weights are zero, not
    only on shapes.
    """
    modules = tuple((name, id(type(m)), type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules())
    with torch.no_grad():
        tensors = tuple((name, tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum()), int(torch.count_nonzero(t)))
                        for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point())
    return modules, tensors


def measure_lattices(model: nn.Module, layers: Sequence[LayerInfo], input_size: Sequence[int],
                     device: str | torch.device = "cpu", seed: int = 0,
                     max_size: int = MAX_PROBE_SIZE) -> dict[str, Lattice | str]:
    """Measure the lattice of each spatial layer; ``{name: Lattice}``, or ``{name: reason}`` where it failed.

    See :func:`_measure_lattices`; results are kept for the same model
    architecture and weights, input size and layers (a few, per process).
    """
    key = (_fingerprint(model), tuple(int(v) for v in input_size), tuple(layer.name for layer in layers), seed, max_size)
    if key not in _cache:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = _measure_lattices(model, layers, input_size, device, seed, max_size)
    return dict(_cache[key])


def _measure_lattices(model: nn.Module, layers: Sequence[LayerInfo], input_size: Sequence[int],
                      device: str | torch.device, seed: int, max_size: int) -> dict[str, Lattice | str]:
    """:func:`measure_lattices` without the cache.

    ``input_size`` (C, H, W) is the model's input; the model must be in eval
    mode (batch items independent). See the module docstring for the probes.
    """
    wanted = [layer for layer in layers if layer.spatial and layer.stride]
    if not wanted:
        return {}
    period = 1
    for layer in wanted:
        period = math.lcm(period, _lattice_stride_guess(float(layer.stride)))
    channels, height, width = (int(v) for v in input_size[-3:])
    generator = torch.Generator().manual_seed(seed)
    axes = {}
    with _frozen(model):
        for axis in (-1, -2):
            across = _choose_across(model, wanted, channels, (height, width), axis, period, generator, device)
            probe = _AxisProbe(model, channels, (height, width), axis, period, across, generator, device)
            axes[axis] = _probe_axis(probe, wanted, max_size)
    results: dict[str, Lattice | str] = {}
    for layer in wanted:
        fx, fy = axes[-1][layer.name], axes[-2][layer.name]
        if isinstance(fx, str) or isinstance(fy, str):
            results[layer.name] = fx if isinstance(fx, str) else fy
            continue
        results[layer.name] = Lattice(stride_x=fx[0], stride_y=fy[0], offset_x=fx[1], offset_y=fy[1], reach_x=fx[2], reach_y=fy[2])
    return results

def attach_lattices(model: nn.Module, layers: Sequence[LayerInfo], input_size: Sequence[int],
                    device: str | torch.device = "cpu") -> dict[str, str]:
    """Measure and store ``layer.lattice`` for ``layers``; returns ``{name: why}`` for each spatial layer that has none."""
    found = measure_lattices(model, layers, input_size, device)
    missing = {}
    for layer in layers:
        value = found.get(layer.name)
        layer.lattice = value if isinstance(value, Lattice) else None
        if layer.spatial and not isinstance(value, Lattice):
            missing[layer.name] = value or "not measured"
    return missing
