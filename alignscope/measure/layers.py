"""Streaming statistics of every (layer, transform) pair: :class:`LayerMeter`, beside the output's
:class:`~alignscope.measure.prediction.PredictionMeter`.

``update`` takes one :class:`~alignscope.inputs.pairs.LayerPair` of a batch (and its fitted
alignments' maps), ``states`` are the float64 tensors to sum across processes (the merge of a
sharded run), ``rows`` the table's layer rows. Distances are those of
:func:`~alignscope.measure.metrics.pair_distances`, divided by the chance distance.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from ..columns import DISTANCE_QUANTITIES, REGISTERED_QUANTITIES
from ..geometry.transforms import Transform
from ..inputs.pairs import LayerPair, registration_columns, uses_disk
from ..model.capture import LayerInfo
from ..floors import images_shortfall, near_duplicates, support_shortfall
from .metrics import AlignmentStatistic, pair_distances, reference_terms, registered_distances
from .prediction import image_rows

Key = tuple[str, str, str]  # (layer, transform spec, sweep)


def count_nonfinite(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images of a batch whose raw distances are NaN/inf: their feature maps were (or squared to) NaN/inf.

    The raw distances (not the ratios, which are NaN for a zero chance distance by design) are
    finite whenever the maps are finite and their squares fit in the maps' dtype.
    """
    raw = torch.stack([values[name] for name in ("aligned", "unaligned", "floor", "chance_distance")])
    return (~torch.isfinite(raw).all(dim=0)).sum().to(torch.float64).reshape(1).cpu()


class LayerMeter:
    """Per (layer, transform): an :class:`AlignmentStatistic` of the distances and a count of non-finite images.

    ``fitted``: the quantities the fitted alignments add (``optimal``, ``channel_mapped``, ...);
    each is measured as ``<quantity>_error``. ``per_image``: keep one row per image too.
    """

    def __init__(self, model_name: str, layers: Sequence[LayerInfo], transforms: Sequence[Transform],
                 fitted: Sequence[str] = (), per_image: bool = False) -> None:
        self.model_name, self.layers, self.transforms = model_name, list(layers), list(transforms)
        self.fitted = tuple(fitted)
        quantities = DISTANCE_QUANTITIES + REGISTERED_QUANTITIES + tuple(f"{q}_error" for q in self.fitted)
        self.stats = {(layer.name, t.spec, t.sweep): AlignmentStatistic(quantities) for layer in self.layers
                      for t in self.transforms}
        self.nonfinite = {key: torch.zeros(1, dtype=torch.float64) for key in self.stats}
        # images left out below the denominator floor: (identical maps, near-duplicate images)
        self.shortfall = {key: torch.zeros(2, dtype=torch.float64) for key in self.stats}
        self.per_image = per_image
        self.image_rows: list[tuple[int, dict]] = []  # (batch index, row)
        self._shared: dict = {}
        self._identical: torch.Tensor | None = None
        self._near: torch.Tensor | None = None

    def new_batch(self, x: torch.Tensor | None = None, partners: torch.Tensor | None = None) -> None:
        """Start a batch: forget the shared reference terms; with the images ``x`` and their chance ``partners``
        (both (B, C, H, W)), mark the images whose partner is a near-duplicate (left out of every row)."""
        self._shared = {}
        self._identical = self._near = None
        if x is not None and partners is not None:
            self._identical, self._near = near_duplicates(x, partners)

    def update(self, pair: LayerPair, extras: Mapping[str, torch.Tensor] | None = None, batch_index: int = 0,
               names: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Add one pair's per-image distances (``extras``: fitted alignments' maps by quantity); returns them."""
        share_key = (pair.layer.name, pair.disk, id(pair.mask))
        if share_key not in self._shared:  # a and its chance partner's terms are the same for every transform
            self._shared[share_key] = reference_terms(pair.reference, pair.other, pair.mask)
        terms = self._shared[share_key]
        values = pair_distances(reference=pair.reference, aligned=pair.aligned, unaligned=pair.moved, other=pair.other,
                                mask=pair.mask, roundtrip=pair.roundtrip, extras=extras, terms=terms)
        values.update(registered_distances(pair.reference, pair.registered_reference, pair.registered, pair.other,
                                           pair.registered_mask, terms if pair.registered_mask is pair.mask else None))
        key = (pair.layer.name, pair.transform.spec, pair.transform.sweep)
        identical = values["chance_distance"] == 0
        near = torch.zeros_like(identical)
        if self._near is not None:
            identical = identical | self._identical.to(identical.device)
            near = self._near.to(identical.device) & ~identical
            if bool(near.any()):  # chance is no scale for these images: every ratio is left out
                for name, value in values.items():
                    if name.endswith("_error") or name == "aligned_cosine":
                        values[name] = torch.where(near, torch.full_like(value, math.nan), value)
        self.stats[key].update(values)
        self.nonfinite[key] += count_nonfinite(values)
        self.shortfall[key] += torch.stack([identical.sum(), near.sum()]).to("cpu", torch.float64)
        if self.per_image:
            self.image_rows.extend((batch_index, row) for row in image_rows(
                self.model_name, pair.layer.name, pair.transform, names, values))
        return values

    def states(self) -> list[torch.Tensor]:
        """The float64 tensors whose sums over processes merge sharded meters."""
        return [*(stat.state for stat in self.stats.values()), *self.nonfinite.values(), *self.shortfall.values()]

    def rows(self, image_size: Sequence[int], mask_mode: str, pretrained: bool, masks: Mapping, registered_masks: Mapping,
             extra_columns: Callable[[Key], dict] | None = None) -> list[dict]:
        """One row per (layer, transform), in layer then transform order; ``extra_columns(key)`` adds the fits'."""
        height, width = (int(v) for v in image_size)
        records = []
        for depth, layer in enumerate(self.layers, start=1):
            for transform in self.transforms:
                disk = uses_disk(transform, mask_mode)
                key = (layer.name, transform.spec, transform.sweep)
                result = self.stats[key].compute()
                stride = float(layer.stride or 1)
                exact = transform.exact_on(height, width, 1.0) and transform.exact_on(layer.shape[1], layer.shape[2], stride)
                valid = masks.get((layer.name, transform.spec, disk))
                record = {
                    "model": self.model_name, "layer": layer.name, "depth": depth, "module": layer.module_type,
                    "channels": layer.shape[0], "height": layer.shape[1], "width": layer.shape[2], "stride": stride,
                    "transform": transform.spec, "exact": bool(exact), "n_images": int(result["aligned_error_n"]),
                }
                for name in ("aligned_error", "aligned_error_std", "aligned_error_ci_low", "aligned_error_ci_high",
                             "unaligned_error", "floor_error", "aligned_cosine", "unaligned_error_ci_low",
                             "unaligned_error_ci_high", "floor_error_ci_low", "floor_error_ci_high", "chance_distance",
                             "reference_norm"):
                    record[name] = result[name]
                record.update({
                    "valid_fraction": float(valid.mean()) if valid is not None else math.nan,
                    "mask": "disk" if disk else "none", "sweep": transform.sweep, "magnitude": transform.magnitude,
                    "pretrained": pretrained,
                })
                if self.fitted:
                    for quantity in self.fitted:
                        for suffix in ("", "_ci_low", "_ci_high"):
                            record[f"{quantity}_error{suffix}"] = result[f"{quantity}_error{suffix}"]
                if extra_columns is not None:
                    record.update(extra_columns(key))
                record.update(registration_columns(layer, transform, (height, width), result,
                                                   registered_masks.get((layer.name, transform.spec, disk)), valid))
                record["n_nonfinite"] = int(self.nonfinite[key].item())
                record["n_identical"], record["n_near_duplicate"] = (int(v) for v in self.shortfall[key].tolist())
                total = layer.shape[1] * layer.shape[2]
                record["why_missing"] = support_shortfall(int(valid.sum()) if valid is not None else total, total)
                if record["why_missing"]:
                    _blank(record)  # nothing was compared: no image counts as identical or near-duplicate either
                    record["n_identical"] = record["n_near_duplicate"] = 0
                else:
                    record["why_missing"] = images_shortfall(record["n_images"], record["n_identical"],
                                                             record["n_near_duplicate"], record["n_nonfinite"])
                records.append(record)
        return records


def _blank(record: dict) -> None:
    """A row below the support floor: every measured number NaN and no image counted (the reason is set)."""
    for name, value in record.items():
        if name.endswith(("_error", "_std", "_ci_low", "_ci_high", "_cosine")) and isinstance(value, float):
            record[name] = math.nan
    record["n_images"] = 0
