"""Replacing one layer's output during a forward pass: the hook behind the ideal-STN placement.

An STN at layer k changes one tensor, the output of k, and the network finishes from
there; every other path (a skip connection around k, a parallel branch) still carries
what the unchanged input gives. :class:`MapSubstitution` does exactly that: a forward
hook on each selected layer's module returns the module's output with that layer's
tensor replaced by a given (B, C, H, W) map, written back in the layer's own layout
(:meth:`~alignscope.model.layouts.Layout.from_nchw`: channels-last maps permuted back,
token grids re-flattened behind their prefix tokens, which are kept; one element of a
list output replaced, the others kept).

>>> with MapSubstitution(model, layers) as substitution:
...     with substitution.replacing(layer, warped):   # warped: (B, C, H, W)
...         logits = model(moved_images)

A module that runs more than once in a forward pass (a shared activation, a block
reused in a loop) gives no single place to substitute: :meth:`replacing` raises
:class:`~alignscope.errors.LayerError` naming it, after the pass.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LayerError
from .capture import ForwardHooks, LayerInfo


class MapSubstitution(ForwardHooks):
    """Forward hooks that replace one armed layer's output by a given map (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo]) -> None:
        self.model = model
        self.layers = list(layers)
        super().__init__()
        self._armed: tuple[LayerInfo, torch.Tensor] | None = None
        self._calls = 0
        self._modules: dict[str, nn.Module] = {}

    def __enter__(self) -> "MapSubstitution":
        modules = self._modules = dict(self.model.named_modules())
        sources = {layer.source for layer in self.layers}
        for source in sources:
            if source not in modules:
                self.close()
                raise LayerError(f"unknown layer module {source!r}")
            self._handles.append(modules[source].register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, inputs: object, output: object) -> object:
        if self._armed is None:
            return None
        layer, nchw = self._armed
        if module is not self._modules[layer.source]:
            return None
        self._calls += 1
        if self._calls > 1:
            return None  # counted, refused after the pass
        value = layer.select(output)
        if not isinstance(value, torch.Tensor) or value.shape[0] != nchw.shape[0]:
            raise LayerError(f"layer {layer.name!r} did not return a per-image tensor for the substitution")
        replaced = layer.layout.from_nchw(nchw, value)
        if layer.element is None:
            return replaced
        items = list(output)  # type: ignore[arg-type]
        items[layer.element] = replaced
        return type(output)(items) if isinstance(output, tuple) else items

    @contextlib.contextmanager
    def replacing(self, layer: LayerInfo, nchw: torch.Tensor) -> Iterator["MapSubstitution"]:
        """Within this block, forward passes replace ``layer``'s output by ``nchw`` (B, C, H, W) at the probed shape."""
        if tuple(nchw.shape[1:]) != tuple(layer.shape or ()):
            raise LayerError(f"a substitute for {layer.name!r} must be (B, {', '.join(map(str, layer.shape or ()))}), "
                             f"got {tuple(nchw.shape)}")
        self._armed, self._calls = (layer, nchw), 0
        try:
            yield self
            if self._calls != 1:
                raise LayerError(f"module {layer.source!r} ran {self._calls} times in one forward pass; an STN placed "
                                 "there has no single tensor to warp" if self._calls else
                                 f"module {layer.source!r} did not run in the forward pass")
        finally:
            self._armed, self._calls = None, 0
