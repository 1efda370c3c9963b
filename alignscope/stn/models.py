"""A small CNN classifier with a spatial transformer placed in one of several ways.

Classifier: four conv blocks (8, 16, 32, 32 channels; 3 x 3 conv, batch norm,
ReLU; max-pool after blocks 2 and 3: 28 -> 28 -> 14 -> 7 -> 7) and a linear
layer on the global average. Variants (``VARIANTS``):

- ``none``: the classifier alone;
- ``input``: a small localization net reads the input image, the warp is
  applied to the input;
- ``features@k`` (k = 1, 2, 3): a localization head reads the feature map after
  block k and the warp is applied to that map;
- ``deep-input``: a deeper separate localization net (four half-width blocks)
  reads the input, the warp is applied to the input;
- ``shared@k``: the localization head reads the classifier's *own* block-k
  features of the input (shared parameters), the warp is applied to the input
  image, which then goes through the whole classifier.

The localization head regresses warp parameters with its last layer
initialized so that the warp starts as the identity. Warps: ``affine`` (6
numbers), ``rotation`` (an angle), ``rotation_scale`` (an angle and a log
zoom), all in normalized coordinates about the centre (``align_corners=False``).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("none", "input", "features@1", "features@2", "features@3", "deep-input", "shared@1", "shared@2", "shared@3")
WARPS = {"affine": 6, "rotation": 1, "rotation_scale": 2}
WIDTHS = (8, 16, 32, 32)
POOL_AFTER = (False, True, True, False)


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class LocalizationHead(nn.Module):
    """Feature map -> warp parameters: conv, ReLU, 3 x 3 average pool, two linear layers (identity at init)."""

    def __init__(self, channels: int, warp: str, hidden: int = 32) -> None:
        super().__init__()
        self.warp = warp
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 9, hidden)
        self.fc2 = nn.Linear(hidden, WARPS[warp])
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]) if warp == "affine" else torch.zeros(WARPS[warp]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.conv(features)), 3).flatten(1)
        return theta_from_params(self.fc2(F.relu(self.fc1(h))), self.warp)


def theta_from_params(params: torch.Tensor, warp: str) -> torch.Tensor:
    """(B, P) parameters -> (B, 2, 3) sampling matrices (output point q samples the input at theta q)."""
    if warp == "affine":
        return params.reshape(-1, 2, 3)
    angle = params[:, 0]
    scale = torch.exp(params[:, 1]) if warp == "rotation_scale" else torch.ones_like(angle)
    c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(angle)
    return torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)


def spatial_transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of x at theta q for each output point q (zeros outside)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class STNClassifier(nn.Module):
    """The classifier with the spatial transformer of ``variant`` (see the module docstring)."""

    def __init__(self, variant: str = "none", n_classes: int = 10, warp: str = "affine") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if warp not in WARPS:
            raise ValueError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
        self.variant, self.warp = variant, warp
        channels = (1, *WIDTHS)
        self.blocks = nn.ModuleList(conv_block(channels[i], channels[i + 1], POOL_AFTER[i]) for i in range(4))
        self.head = nn.Linear(WIDTHS[-1], n_classes)
        match = re.fullmatch(r"(features|shared)@(\d)", variant)
        self.k = int(match.group(2)) if match else 0
        self.localization: nn.Module | None = None
        self.loc_body: nn.Module | None = None
        if variant == "input":
            self.loc_body = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
                                          nn.Conv2d(8, 8, 5, padding=2), nn.MaxPool2d(2), nn.ReLU())
            self.localization = LocalizationHead(8, warp)
        elif variant == "deep-input":
            half = (1, *(w // 2 for w in WIDTHS))
            self.loc_body = nn.Sequential(*(conv_block(half[i], half[i + 1], POOL_AFTER[i]) for i in range(4)))
            self.localization = LocalizationHead(half[-1], warp)
        elif self.k:
            self.localization = LocalizationHead(WIDTHS[self.k - 1], warp)

    @property
    def warps_input(self) -> bool:
        return self.variant in ("input", "deep-input") or self.variant.startswith("shared@")

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The warp the model applies for input ``x`` (for ``features@k``: the one applied to block k's map)."""
        if self.localization is None:
            return None
        if self.loc_body is not None:
            return self.localization(self.loc_body(x))
        h = x
        for block in self.blocks[: self.k]:
            h = block(h)
        return self.localization(h)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps after each block (and the warped map ``stn`` at the insertion point), for analysis."""
        out: dict[str, torch.Tensor] = {}
        theta = self.predict_theta(x) if self.warps_input else None
        if theta is not None:
            x = spatial_transform(x, theta)
            out["stn"] = x
        h = x
        for index, block in enumerate(self.blocks, start=1):
            h = block(h)
            if self.variant.startswith("features@") and index == self.k:
                h = spatial_transform(h, self.localization(h))
                out["stn"] = h
            out[f"block{index}"] = h
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(x)["block4"]
        return self.head(h.mean(dim=(2, 3)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
