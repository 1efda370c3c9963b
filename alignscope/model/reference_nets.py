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
see them. :class:`C8Classifier` puts a linear read-out of every cell (not
invariant) on one of the two, for the placement rows: an exact STN at
``pooled`` restores its prediction, one at ``regular`` only together with
the channel permutation. ``e2cnn`` is needed only for the C8 networks
(``pip install e2cnn``).
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


class C8Classifier(nn.Module):
    """:class:`C8Network`, then a linear map of every cell of its ``reads`` output (``"pooled"`` or ``"regular"``)
    to ``classes`` scores; ``size`` is the square input's side in pixels. Its layers are ``body.regular`` and
    ``body.pooled``."""

    def __init__(self, reads: str = "pooled", size: int = 32, classes: int = 10, fields: int = 4, seed: int = 0) -> None:
        super().__init__()
        if reads not in ("pooled", "regular"):
            raise ValueError(f"reads must be 'pooled' or 'regular', got {reads!r}")
        self.body = C8Network(fields=fields, seed=seed)
        self.reads = reads
        channels = fields if reads == "pooled" else fields * GROUP_ORDER
        self.head = nn.Linear(channels * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads == "pooled":
            return self.head(self.body(x).flatten(1))
        body = self.body
        h = body.conv2(body.relu(body.conv1(body._geometric(x, body.in_type))))
        return self.head(body.regular(h.tensor).flatten(1))


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
