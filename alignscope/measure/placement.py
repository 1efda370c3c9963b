"""Ideal-STN placement: how much of the prediction survives an exact spatial transformer at layer k?

For a transform g and a layer k, the placement pass feeds g x, replaces k's output
b = F_k(g x) by g⁻¹ b (the aligned map of the layer rows: the same warp, zero fill where
g⁻¹ reaches outside the map, exact index operations where g is exact on the layer's grid)
and lets the network finish (:class:`~alignscope.model.substitute.MapSubstitution`). The
prediction is compared with f(x), the model's output for the untransformed image, as the
output rows compare f(g x):

- ``placed_agreement``: share of images whose top-1 class equals f(x)'s, 95% Wilson interval;
- ``placed_kl``: mean KL(p(x) ‖ p_placed) in nats, 95% Student-t interval;
- ``placement_drop``: ``placed_agreement`` of the placement just before this one (in depth
  order, the input first) minus this one's: the part of the prediction lost to the modules
  between the two places.

The input placement (``layer`` = ``input``, depth 0) feeds g⁻¹(g x): an STN in front of
the network. For g that resamples, that is the output rows' floor f(g⁻¹ g x) itself; for g
exact on the pixel grid it is f(x) where g only permutes pixels (flips, quarter turns) and
the real round trip where g loses pixels at the border (translations with zero fill).
The reference lines of the figure are the output rows' ``prediction_agreement`` (no
correction: f(g x)) and ``prediction_agreement_chance``. ``identity`` is measured like any
transform: a placement that does not give agreement 1 and KL 0 under it means the map was
not written back as the model produced it, and the report says so.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..columns import PLACEMENT_QUANTITIES
from ..geometry.transforms import Transform
from ..inputs.pairs import uses_disk
from ..model.capture import LayerInfo
from ..report.output_rows import PLACEMENT_KIND
from .metrics import AlignmentStatistic
from .prediction import compare_predictions

INPUT_PLACEMENT = "input"  # ``layer`` of the row that places the STN in front of the network (depth 0)


def placement_values(reference: torch.Tensor, placed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (B,) float64: top-1 agreement of ``placed`` with ``reference`` (0/1) and KL(p(reference) ‖ p(placed)),
    nats, from (B, K) class scores; NaN where either is not finite."""
    if reference.shape != placed.shape or reference.ndim != 2:
        raise ValueError(f"placed scores {tuple(placed.shape)} must have the reference's (B, K) shape {tuple(reference.shape)}")
    log_p = torch.log_softmax(reference.to(torch.float64), dim=1)
    agreement, kl = compare_predictions(log_p, log_p.argmax(dim=1), torch.isfinite(reference).all(dim=1), placed)
    return {"placed_agreement": agreement, "placed_kl": kl}


class PlacementMeter:
    """Streaming statistics of :func:`placement_values` per (place, alignment, transform), one
    :class:`AlignmentStatistic` each.

    Places are :data:`INPUT_PLACEMENT` and the layers' names; the alignment (``placed_by``) is
    ``inverse`` (g⁻¹) or a fit's (see :mod:`alignscope.engine.placement`). ``skipped`` maps a layer that
    cannot be placed to the reason (its rows say so in ``why_missing``).
    """

    def __init__(self, layers: Sequence[LayerInfo], transforms: Sequence[Transform], placed_by: Sequence[str] = ("inverse",)) -> None:
        self.layers, self.transforms, self.placed_by = list(layers), list(transforms), list(placed_by)
        self.stats: dict[tuple[str, str, str, str], AlignmentStatistic] = {}
        for t in self.transforms:
            self.stats[(INPUT_PLACEMENT, "inverse", t.spec, t.sweep)] = self._statistic()
            for by in self.placed_by:
                for layer in self.layers:
                    self.stats[(layer.name, by, t.spec, t.sweep)] = self._statistic()
        self.skipped: dict[str, str] = {}

    @staticmethod
    def _statistic() -> AlignmentStatistic:
        return AlignmentStatistic(PLACEMENT_QUANTITIES, proportions=("placed_agreement",))

    def update(self, place: str, placed_by: str, transform: Transform, reference: torch.Tensor,
               placed: torch.Tensor) -> dict[str, torch.Tensor]:
        values = placement_values(reference, placed)
        self.stats[(place, placed_by, transform.spec, transform.sweep)].update(values)
        return values

    def states(self) -> list[torch.Tensor]:
        return [stat.state for stat in self.stats.values()]

    def rows(self, model: str, image_size: Sequence[int], mask_mode: str, pretrained: bool,
             n_calibration: int | None = None) -> list[dict]:
        """The placement rows, per transform and alignment in depth order (the input first), with ``placement_drop``."""
        height, width = (int(v) for v in image_size)
        records = []
        for transform in self.transforms:
            key = (transform.spec, transform.sweep)
            start = self.stats[(INPUT_PLACEMENT, "inverse", *key)].compute()
            for by in self.placed_by:
                before = math.nan
                places = [(INPUT_PLACEMENT, 0, None)] if by == "inverse" else []
                places += [(layer.name, depth, layer) for depth, layer in enumerate(self.layers, 1)]
                if by != "inverse":
                    before = start["placed_agreement"]
                for place, depth, layer in places:
                    result = self.stats[(place, by, *key)].compute()
                    if by == "registered" and result["placed_agreement_n"] == 0 and place not in self.skipped:
                        continue  # g exact on this layer's grid, or no lattice: the inverse row is the registered one
                    stride = float(layer.stride or 1) if layer is not None else 1.0
                    record = {
                        "model": model, "layer": place, "depth": depth,
                        "module": layer.module_type if layer is not None else "input image",
                        "channels": layer.channels if layer is not None else 3,
                        "height": int(layer.shape[1]) if layer is not None else height,
                        "width": int(layer.shape[2]) if layer is not None else width,
                        "stride": stride, "transform": transform.spec,
                        "exact": bool(transform.exact_on(height, width, stride)),
                        "n_images": int(result["placed_agreement_n"]),
                        "mask": "disk" if uses_disk(transform, mask_mode) else "none", "sweep": transform.sweep,
                        "magnitude": transform.magnitude, "pretrained": pretrained, "kind": PLACEMENT_KIND,
                        "placed_by": by,
                    }
                    for quantity in PLACEMENT_QUANTITIES:
                        for suffix in ("", "_ci_low", "_ci_high"):
                            record[f"{quantity}{suffix}"] = result[f"{quantity}{suffix}"]
                    agreement = result["placed_agreement"]
                    record["placement_drop"] = before - agreement
                    if not math.isnan(agreement):
                        before = agreement
                    if place in self.skipped:
                        record["why_missing"] = self.skipped[place]
                    elif record["n_images"] == 0:
                        record["why_missing"] = "no finite model outputs"
                    if n_calibration is not None:
                        record["n_calibration"] = n_calibration
                    records.append(record)
        return records
