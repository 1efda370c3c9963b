"""Sampling lattices: where a layer's cells sit on the input image, measured.

Pixel coordinates
-----------------
Input pixel k (0-based) has its centre at coordinate k; x to the right,
y down. A layer of stride s samples a feature field on the lattice

    cell (i, j) -> input point (stride_x * j + offset_x, stride_y * i + offset_y).

The centred frame that :mod:`alignscope.warping` assumes (``align_corners=False``)
is offset (s - 1) / 2 on an input of exactly s cells per cell. Real layers
differ: a 3 x 3 stride-2 convolution with padding 1 on an even input puts
cell j at 2 j (offset 0, half a pixel before the centred frame), TF "SAME"
padding puts it at 2 j + 1 (half a pixel after).

How it is measured
------------------
Not from module types: :func:`measure_lattices` back-propagates an interior
cell and its neighbour along one axis to a random probe input and reads
the support of each gradient (the pixels that influence the cell). A
cell's centre is the midpoint of its support, the stride is the distance
between the two centres, and the support's reach on either side is kept
(the registered comparison leaves out the cells whose support reaches past
the image). The probe is large enough that no support touches its border (it
grows until none does; one long, thin probe per axis keeps it cheap) and has the model's input size modulo every stride,
because "SAME" padding depends on the input size modulo the stride.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .hooks import LayerInfo

MAX_PROBE_SIZE = 2048
_CACHE_SIZE = 16
# measurements by (model fingerprint, input size, layers): the probe costs several forward and backward
# passes on large inputs, and one process often analyzes the same model again (API loops, sweeps)
_cache: dict[tuple, dict[str, "Lattice | str"]] = {}


@dataclass(frozen=True)
class Lattice:
    """A layer's sampling lattice in input pixels (see the module docstring for the frame).

    ``reach_x`` / ``reach_y``: how far the measured support of a cell extends
    (before, after) its centre, in input pixels.
    """

    stride_x: float
    stride_y: float
    offset_x: float
    offset_y: float
    reach_x: tuple[float, float]
    reach_y: tuple[float, float]

    @property
    def stride(self) -> tuple[float, float]:
        return self.stride_x, self.stride_y

    @property
    def offset(self) -> tuple[float, float]:
        return self.offset_x, self.offset_y

    @property
    def centred_shift(self) -> tuple[float, float]:
        """(x, y) pixels by which the lattice sits after the centred frame's (s - 1) / 2."""
        return self.offset_x - (self.stride_x - 1) / 2, self.offset_y - (self.stride_y - 1) / 2

    def cell_to_pixel(self) -> torch.Tensor:
        """3 x 3 float64 matrix sending homogeneous cell indices (j, i, 1) to input pixels (x, y, 1)."""
        return torch.tensor([[self.stride_x, 0.0, self.offset_x], [0.0, self.stride_y, self.offset_y], [0.0, 0.0, 1.0]],
                            dtype=torch.float64)


class _Stop(Exception):
    """Ends the probe's forward pass once every wanted layer has run."""


def _probe_size(size: int, period: int, at_least: int) -> int:
    """The smallest size >= ``at_least`` congruent to ``size`` modulo ``period``."""
    steps = max(0, math.ceil((at_least - size) / period))
    return size + steps * period


def _axis_support(grad: torch.Tensor, axis: int) -> tuple[int, int] | None:
    """(first, last) index along ``axis`` (-1: columns, -2: rows) of the non-zero pixels of a (C, H, W) gradient."""
    hit = grad.abs().sum(dim=0) > 0
    line = hit.any(dim=-2 if axis == -1 else -1)
    where = torch.nonzero(line).flatten()
    return (int(where[0]), int(where[-1])) if where.numel() else None


def _capture_with_grad(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and name not in captured:
                # a clone keeps the value the layer returned, even if a later in-place op overwrites it
                captured[name] = output.clone()
            if len(captured) == len(names):
                raise _Stop

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        try:
            model(x)
        except _Stop:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


_AxisLattice = tuple[float, float, tuple[float, float]]  # stride, offset, reach (before, after)


def _measure_axis(output: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, axis: int) -> _AxisLattice | str:
    """Stride, offset and reach along ``axis`` from the supports of two neighbouring cells of ``output`` (2, C, h, w).

    Batch item 0 back-propagates cell k, item 1 cell k + 1 (k along ``axis``,
    the middle of the other axis), so one backward pass gives both supports.
    """
    if output.ndim != 4 or output.shape[axis] < 4:
        return f"output {tuple(output.shape)} has too few cells on the probe to find an interior one"
    h, w = output.shape[-2:]
    k = output.shape[axis] // 2 - 1
    first, second = (k, w // 2) if axis == -2 else (h // 2, k), (k + 1, w // 2) if axis == -2 else (h // 2, k + 1)
    weights = weights[: output.shape[1]]
    target = (output[0, :, first[0], first[1]] * weights).sum() + (output[1, :, second[0], second[1]] * weights).sum()
    (grad,) = torch.autograd.grad(target, x, retain_graph=True, allow_unused=True)
    if grad is None:
        return "the layer's output does not depend on the input"
    supports = _axis_support(grad[0], axis), _axis_support(grad[1], axis)
    if supports[0] is None or supports[1] is None:
        return "zero gradient at the probe cell (no support to measure)"
    if any(lo == 0 or hi == x.shape[axis] - 1 for lo, hi in supports):
        return "clipped"
    centre0, centre1 = (sum(supports[0]) / 2, sum(supports[1]) / 2)
    stride = centre1 - centre0
    if stride <= 0:
        return f"neighbouring cells' supports are not ordered (stride {stride:g}); not a lattice"
    return stride, centre0 - stride * k, (centre0 - supports[0][0], supports[0][1] - centre0)


def _probe_axis(model: nn.Module, layers: Sequence[LayerInfo], input_size: Sequence[int], axis: int, period: int,
                generator: torch.Generator, device: str | torch.device, max_size: int) -> dict[str, _AxisLattice | str]:
    """Measure one axis with probes long along it and short across it (cost grows with the probe's area)."""
    channels, height, width = (int(v) for v in input_size)
    along, across = (width, height) if axis == -1 else (height, width)
    # across: one cell of the deepest layer is enough; the support's extent along the axis does not depend on it
    size_across = _probe_size(across, period, period)
    target = max(along, 64)
    results: dict[str, _AxisLattice | str] = {}
    pending = list(layers)
    while pending:
        size_along = _probe_size(along, period, target)
        if size_along > max_size:
            results.update((layer.name, f"the layer's support reaches past a {max_size} px probe") for layer in pending)
            break
        shape = (2, channels, size_along, size_across) if axis == -2 else (2, channels, size_across, size_along)
        x = torch.randn(*shape, generator=generator).to(device).requires_grad_(True)
        weights = torch.randn(max(layer.channels for layer in pending), generator=generator).to(device)
        with torch.enable_grad():
            outputs = _capture_with_grad(model, [layer.name for layer in pending], x)
            clipped = []
            for layer in pending:
                output = outputs.get(layer.name)
                found = _measure_axis(output, x, weights, axis) if output is not None else "the layer did not run on the probe"
                if found == "clipped":
                    clipped.append(layer)
                else:
                    results[layer.name] = found
        pending = clipped
        target = 2 * size_along
    return results


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

    ``input_size`` (C, H, W) is the model's input. Each axis is measured on
    a batch of two random images long along that axis and short across it;
    every probe size equals the model's modulo the least common multiple of
    the layers' strides. The long side starts at the input's (at least
    64 px) and doubles while a support touches the probe's border, up
    to ``max_size``. The model must be in eval mode (batch items independent).
    """
    wanted = [layer for layer in layers if layer.spatial and layer.stride]
    if not wanted:
        return {}
    period = 1
    for layer in wanted:
        period = math.lcm(period, max(1, int(round(layer.stride))))
    generator = torch.Generator().manual_seed(seed)
    along_x = _probe_axis(model, wanted, input_size, -1, period, generator, device, max_size)
    along_y = _probe_axis(model, wanted, input_size, -2, period, generator, device, max_size)
    results: dict[str, Lattice | str] = {}
    for layer in wanted:
        fx, fy = along_x[layer.name], along_y[layer.name]
        if isinstance(fx, str) or isinstance(fy, str):
            results[layer.name] = fx if isinstance(fx, str) else fy
            continue
        results[layer.name] = Lattice(stride_x=fx[0], stride_y=fy[0], offset_x=fx[1], offset_y=fy[1], reach_x=fx[2], reach_y=fy[2])
    return results


def attach_lattices(model: nn.Module, layers: Sequence[LayerInfo], input_size: Sequence[int],
                    device: str | torch.device = "cpu") -> list[str]:
    """Measure and store ``layer.lattice`` for ``layers``; returns one line per layer that has none, saying why."""
    found = measure_lattices(model, layers, input_size, device)
    problems = []
    for layer in layers:
        value = found.get(layer.name)
        layer.lattice = value if isinstance(value, Lattice) else None
        if layer.spatial and not isinstance(value, Lattice):
            problems.append(f"{layer.name}: {value or 'not measured'}")
    return problems
