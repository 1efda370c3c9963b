"""Reference networks whose alignment is known by construction.

:class:`C8Network` is rotation-equivariant (e2cnn, the cyclic group C8 with
regular representations): rotating the input by 90 degrees rotates every
feature map *and* cyclically shifts the 8 channels of each field by two. So
after g^-1 its ``regular`` output is misaligned channel-wise but a channel
permutation aligns it exactly, and its ``pooled`` output (max over each
field, rotation-invariant) aligns with g^-1 alone. :class:`PlainNetwork` has
the same layers and channel counts with ordinary convolutions: neither g^-1
nor a permutation aligns it. Both expose their tensors as the outputs of
``nn.Identity`` modules named ``regular`` and ``pooled`` so the hooks can
see them. ``e2cnn`` is needed only for :class:`C8Network` (``pip install e2cnn``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import AlignscopeError

GROUP_ORDER = 8


class C8Network(nn.Module):
    """R2Conv (3 trivial -> ``fields`` regular) -> ReLU -> R2Conv -> [regular] -> GroupPooling -> [pooled]."""

    def __init__(self, fields: int = 4, kernel_size: int = 5, seed: int = 0) -> None:
        super().__init__()
        try:
            from e2cnn import gspaces
            from e2cnn import nn as enn
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise AlignscopeError("C8Network needs the e2cnn package; install it with: pip install e2cnn") from exc
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # e2cnn 0.2 indexes with uint8 masks when building its kernel basis; harmless, and not ours to fix.
            warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
            self._build(gspaces, enn, fields, kernel_size)

    def _build(self, gspaces, enn, fields: int, kernel_size: int) -> None:
        space = gspaces.Rot2dOnR2(N=GROUP_ORDER)
        self._geometric = enn.GeometricTensor
        self.in_type = enn.FieldType(space, 3 * [space.trivial_repr])
        hidden = enn.FieldType(space, fields * [space.regular_repr])
        self.conv1 = enn.R2Conv(self.in_type, hidden, kernel_size, padding=kernel_size // 2)
        self.relu = enn.ReLU(hidden)
        self.conv2 = enn.R2Conv(hidden, hidden, kernel_size, padding=kernel_size // 2)
        self.group_pool = enn.GroupPooling(hidden)
        self.regular = nn.Identity()
        self.pooled = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.relu(self.conv1(self._geometric(x, self.in_type))))
        self.regular(h.tensor)
        return self.pooled(self.group_pool(h).tensor)


class PlainNetwork(nn.Module):
    """The same shapes with ordinary convolutions; ``pooled`` is the max over each group of 8 channels."""

    def __init__(self, fields: int = 4, kernel_size: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        channels = fields * GROUP_ORDER
        self.conv1 = nn.Conv2d(3, channels, kernel_size, padding=kernel_size // 2)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.regular = nn.Identity()
        self.pooled = nn.Identity()
        self.fields = fields

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.regular(self.conv2(self.relu(self.conv1(x))))
        b, _, height, width = h.shape
        return self.pooled(h.reshape(b, self.fields, GROUP_ORDER, height, width).amax(dim=2))
