"""Leave a caller's module as it was found.

A run puts the model in eval mode, may move it to another device or memory format, freezes
its parameters while the lattice probe back-propagates and hooks its layers. For a model the
caller passed as an ``nn.Module``, :func:`left_as_found` undoes all of it when the run ends,
also on an error or an interrupt: train/eval flags, ``requires_grad``, the parameters' and
buffers' device and memory format, and any forward hook the run left behind.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _state(module: nn.Module) -> dict:
    tensors = [*module.parameters(), *module.buffers()]
    return {
        "training": {m: m.training for m in module.modules()},
        "requires_grad": {p: p.requires_grad for p in module.parameters()},
        "devices": {t.device for t in tensors},
        "channels_last": any(t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                             for t in tensors),
        "hooks": {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in module.modules()},
    }


@contextlib.contextmanager
def left_as_found(module: nn.Module | None) -> Iterator[None]:
    """Restore ``module``'s modes, gradient flags, device, memory format and hooks on exit (``None``: nothing to do)."""
    if not isinstance(module, nn.Module):
        yield
        return
    before = _state(module)
    try:
        yield
    finally:
        for m, flag in before["training"].items():
            m.training = flag
        for p, flag in before["requires_grad"].items():
            p.requires_grad_(flag)
        after = _state(module)
        if len(before["devices"]) == 1 and after["devices"] != before["devices"]:
            module.to(next(iter(before["devices"])))
        if after["channels_last"] and not before["channels_last"]:
            module.to(memory_format=torch.contiguous_format)
        for m, (forward, pre) in before["hooks"].items():
            for key in set(m._forward_hooks) - forward:
                del m._forward_hooks[key]
            for key in set(m._forward_pre_hooks) - pre:
                del m._forward_pre_hooks[key]
