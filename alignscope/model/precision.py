"""Half-precision models: fed float32 images like any other, measured in float32.

The analysis prepares images, warps and compares maps in float32 (statistics in float64). A
model whose weights are float16 or bfloat16 would refuse float32 inputs, so
:func:`feed_in_model_dtype` casts every floating input of its forward pass to the model's own
dtype (a forward pre-hook on the root module; the cast is differentiable, so the lattice probe's
gradients still reach the image). The maps it returns are turned back into float32 by
:class:`~alignscope.inputs.pairs.PairFeeder`.
"""
from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def model_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``module``'s parameters (``None`` when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def feed_in_model_dtype(module: nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """For a float16 / bfloat16 model, cast floating inputs to its dtype on every forward; the hook's handle."""
    dtype = model_dtype(module)
    if dtype not in HALF_DTYPES:
        return None

    def cast(_module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return module.register_forward_pre_hook(cast)
