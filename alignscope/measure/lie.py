"""The infinitesimal view: Lie derivatives of each layer's maps and of the prediction.

For a generator v (:mod:`alignscope.geometry.generators`) and a layer F, the Lie derivative is

    L F(x) = d/dt [ g_t⁻¹ F(g_t x) ] at t = 0  =  J_F(x) [ −v·∇x ]  +  v·∇F(x)

(content at p moves to p + t v, so d/dt g_t x = −v·∇x; undoing it on the map adds v·∇F there).
J_F[·] is one forward-mode pass through the model (``torch.autograd.forward_ad``); both gradients
are central differences in the centred frame (the image extended by black, the map by 0, as the
warps fill), v measured in cells of the image and of the map. An equivariant layer has L F = 0. Per image, inside the mask M (the map
without its outer ring of cells; for rotations and shears under ``mask="auto"`` also the centred
disk, as for the finite transforms):

- ``lie_error``: ‖M L F‖ / ‖M (F(x) − F(x'))‖, the chance distance of the layer rows (x' the chance
  partner): how fast, per unit t, g⁻¹ F(g x) leaves F(x), in units of two unrelated images;
- ``lie_relative``: ‖M L F‖ / ‖M F(x)‖;
- at the output (a classifier head), ``lie_output``: the mean over classes of |d p_k / dt|, p the
  softmax: the end-to-end metric of Gruver et al. (2023), "The Lie derivative for measuring learned
  equivariance" (they differentiate their bilinear resampling at t = 0, a one-sided difference,
  where alignscope takes the central one; docs/measures.md says how much that moves the number).

The units of t are the generator's (per radian for ``rotate``, per normalized coordinate for the
translations); the ``lie_unit`` column names it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..columns import LIE_LAYER_QUANTITIES, LIE_OUTPUT_QUANTITIES
from ..geometry.generators import GENERATORS, Generator
from ..geometry.warping import disk_mask
from ..model.capture import LayerInfo
from ..report.output_rows import LIE_KIND
from .metrics import AlignmentStatistic


def lie_mask(height: int, width: int, disk: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) float mask: the map without its outer ring of cells (one-sided differences there), inside the
    centred disk when ``disk``."""
    mask = torch.zeros(height, width, device=device)
    if height > 2 and width > 2:
        mask[1:-1, 1:-1] = 1
    return mask * disk_mask(height, width, device=device) if disk else mask


def layer_lie_values(maps: torch.Tensor, lie: torch.Tensor, partners: torch.Tensor, generator: Generator,
                     disk: bool) -> dict[str, torch.Tensor]:
    """Per image (B,) float64 ``lie_error`` and ``lie_relative`` of one layer from F(x) ``maps`` (B, C, h, w), its
    Lie derivative ``lie`` (same shape) and the chance partners' maps; NaN where a norm is 0."""
    height, width = maps.shape[-2:]
    mask = lie_mask(height, width, disk, maps.device).to(torch.float64)
    norm = (lie.to(torch.float64).square() * mask).sum(dim=(1, 2, 3)).sqrt()
    own = (maps.to(torch.float64).square() * mask).sum(dim=(1, 2, 3)).sqrt()
    chance = ((maps - partners).to(torch.float64).square() * mask).sum(dim=(1, 2, 3)).sqrt()
    nan = torch.full_like(norm, math.nan)
    return {"lie_error": torch.where(chance > 0, norm / chance, nan), "lie_relative": torch.where(own > 0, norm / own, nan)}


def output_lie_values(scores: torch.Tensor, tangents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (B,) float64 ``lie_output``: the mean over the K classes of |d p_k / dt| from the (B, K) scores
    and their tangents (d p = p ⊙ (d f − Σ_k p_k d f_k))."""
    p = torch.softmax(scores.to(torch.float64), dim=1)
    d = tangents.to(torch.float64)
    dp = p * (d - (p * d).sum(dim=1, keepdim=True))
    values = dp.abs().mean(dim=1)
    return {"lie_output": torch.where(torch.isfinite(values), values, torch.full_like(values, math.nan))}


class LieMeter:
    """Streaming statistics of the Lie derivatives per (layer or output, generator)."""

    def __init__(self, layers: Sequence[LayerInfo], generators: Sequence[str], output: bool) -> None:
        unknown = [name for name in generators if name not in GENERATORS]
        if unknown:
            raise ValueError(f"unknown generators {unknown}; known: {', '.join(GENERATORS)}")
        self.layers, self.generators, self.output = list(layers), [GENERATORS[n] for n in generators], output
        self.stats = {(layer.name, g.name): AlignmentStatistic(LIE_LAYER_QUANTITIES) for layer in self.layers
                      for g in self.generators}
        if output:
            self.stats.update({("<output>", g.name): AlignmentStatistic(LIE_OUTPUT_QUANTITIES) for g in self.generators})

    def update(self, layer: str, generator: Generator, values: dict[str, torch.Tensor]) -> None:
        self.stats[(layer, generator.name)].update(values)

    def states(self) -> list[torch.Tensor]:
        return [stat.state for stat in self.stats.values()]

    def rows(self, model: str, output_name: str, output_classes: int | None, pretrained: bool, mask_mode: str) -> list[dict]:
        """One row per (layer, generator) and, with a head, one output row per generator (``kind`` = ``"lie"``)."""
        records = []
        for g in self.generators:
            disk = g.disk and mask_mode == "auto" or mask_mode == "disk"
            common = {"model": model, "transform": f"lie-{g.name}", "kind": LIE_KIND, "lie_unit": g.unit,
                      "mask": "disk" if disk else "none", "pretrained": pretrained}
            for depth, layer in enumerate(self.layers, 1):
                result = self.stats[(layer.name, g.name)].compute()
                record = {**common, "layer": layer.name, "depth": depth, "module": layer.module_type,
                          "channels": layer.channels, "height": int(layer.shape[1]), "width": int(layer.shape[2]),
                          "stride": float(layer.stride or 1), "n_images": int(result["lie_error_n"])}
                for quantity in LIE_LAYER_QUANTITIES:
                    for suffix in ("", "_ci_low", "_ci_high"):
                        record[quantity + suffix] = result[quantity + suffix]
                records.append(record)
            if self.output:
                result = self.stats[("<output>", g.name)].compute()
                record = {**common, "layer": output_name, "depth": len(self.layers) + 1, "module": "model output",
                          "channels": output_classes, "height": 1, "width": 1, "stride": math.nan,
                          "n_images": int(result["lie_output_n"])}
                for suffix in ("", "_ci_low", "_ci_high"):
                    record["lie_output" + suffix] = result["lie_output" + suffix]
                records.append(record)
        return records
