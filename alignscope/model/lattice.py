"""A layer's sampling lattice: where its cells sit on the input image.

Pixel coordinates
-----------------
Input pixel k (0-based) has its centre at coordinate k; x to the right,
y down. A layer of stride s samples a feature field on the lattice

    cell (i, j) -> input point (stride_x * j + offset_x, stride_y * i + offset_y).

The centred frame that :mod:`alignscope.geometry.warping` assumes (``align_corners=False``)
is offset (s - 1) / 2 on an input of exactly s cells per cell. Real layers
differ: a 3 x 3 stride-2 convolution with padding 1 on an even input puts
cell j at 2 j (offset 0, half a pixel before the centred frame), TF "SAME"
padding puts it at 2 j + 1 (half a pixel after).

The lattices are measured by :mod:`.lattice_probe`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
