"""Analyze any torch.nn.Module: a tiny CNN with circular padding, where translations align exactly.

Run:  python examples/custom_module.py

A circularly padded convolution commutes with circular shifts (rolls), so the
inverse warp aligns its feature maps to floating-point precision: everywhere
for roll8,4 (a whole number of cells at stride 1 and 2), and only up to
interpolation for roll3,0 after the stride-2 layer (1.5 cells). rot90 is exact
on the grid, yet the random (not rotation-symmetric) filters leave a gap that
no spatial warp closes.
"""
import torch
from torch import nn

import alignscope

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(3, 16, 5, padding=2, padding_mode="circular"), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
)
report = alignscope.analyze(
    net,
    transforms=["roll8,4", "roll3,0", "rot90"],
    input_size=(3, 96, 96),       # images are resized and centre-cropped to this
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    batch_size=4,
)
print(report)
