"""The prediction itself: does the model's output change when the image is transformed?

For a model with a classifier head (its output is a (B, K) tensor of class
scores, K >= 2), the table gets one more row per transform, after the
layers: the ``output`` row (``kind`` = ``"output"``). With p(.) the softmax
of the output and top-1 its argmax:

- ``prediction_agreement``: the share of images whose top-1 class is the
  same for x and g x (the consistency measure of the anti-aliasing
  literature, Zhang 2019), with a 95% Wilson score interval (a proportion);
- ``prediction_kl``: the mean over images of KL(p(x) || p(g x)) =
  sum_k p_k(x) (log p_k(x) - log p_k(g x)), in nats, with the same 95%
  Student-t interval as every other mean of the table.

Controls, as for the layer rows: ``*_chance`` compares x with its chance
partner (another image: the agreement two unrelated images give) and
``*_floor`` compares x with the image round trip g^-1(g x) (what resampling
alone changes; agreement 1 and KL 0 for transforms exact on the pixel grid,
which make no round trip). The images are the layer rows' own: for a
transform compared inside the disk mask, x is the disk-masked image.
Softmax and KL are computed in float64 from the outputs (float32 under
autocast), one batch at a time.

Whether a model has a head is decided at probe time from evidence
(:func:`find_head`): a timm model must report ``num_classes > 0`` and give
a (B, num_classes) output; any other module must give a (B, K) floating
tensor with K >= 2. Otherwise there is no output row and ``run.json``
(``output``) says why. How the rows sit in the table and read back:
:mod:`alignscope.report.output_rows`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from ..columns import AGREEMENT_QUANTITIES, PREDICTION_QUANTITIES
from ..model.capture import PROBE_BATCH
from .metrics import AlignmentStatistic
from ..inputs.pairs import OutputPair, uses_disk
from ..report.output_rows import OUTPUT_KIND
from ..geometry.transforms import Transform

log = logging.getLogger("alignscope")


@dataclass
class Head:
    """What the probe found at the model's output: class scores to compare (``measured``) or why not."""

    measured: bool
    classes: int | None = None
    reason: str = ""
    evidence: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def find_head(model: nn.Module, input_size: Sequence[int], device: str | torch.device = "cpu") -> Head:
    """Decide from evidence whether ``model`` ends in a classifier head; one forward pass of zeros.

    timm models say so themselves (``get_classifier()``, ``num_classes``):
    ``num_classes = 0`` means pooled features, not class scores. Any model's
    output must then be a floating (batch, K) tensor with K >= 2 (K equal to
    ``num_classes`` where the model reports it).
    """
    num_classes = getattr(model, "num_classes", None)
    timm_head = callable(getattr(model, "get_classifier", None)) and isinstance(num_classes, int)
    if timm_head and num_classes <= 0:
        return Head(False, reason=f"the model reports num_classes = {num_classes}: no classifier head (its output is "
                                  "pooled features, not class scores)", evidence="timm num_classes")
    channels, height, width = (int(v) for v in input_size[-3:])
    with torch.inference_mode():
        output = model(torch.zeros(PROBE_BATCH, channels, height, width, device=device))
    if not isinstance(output, torch.Tensor):
        kind = f"a {type(output).__name__}" + (f" of {len(output)}" if isinstance(output, (list, tuple, dict)) else "")
        return Head(False, reason=f"the model's output is {kind}, not a (batch, classes) tensor", evidence="probe")
    shape = tuple(output.shape)
    if output.ndim != 2 or shape[0] != PROBE_BATCH or not output.is_floating_point():
        return Head(False, reason=f"the model's output ({output.dtype}, shape {shape} for a batch of {PROBE_BATCH}) is not "
                                  "a floating (batch, classes) tensor", evidence="probe")
    if shape[1] < 2:
        return Head(False, reason=f"the model's output has {shape[1]} column(s); top-1 agreement and a softmax need at "
                                  "least 2 classes", evidence="probe")
    if timm_head and shape[1] != num_classes:
        return Head(False, reason=f"the model's output has {shape[1]} columns but it reports num_classes = {num_classes}",
                    evidence="timm num_classes and probe")
    evidence = (f"timm classifier head (num_classes = {num_classes}) and a (batch, {shape[1]}) output" if timm_head
                else f"a (batch, {shape[1]}) floating output (read as class scores)")
    return Head(True, classes=shape[1], evidence=evidence)


def compare_predictions(log_p: torch.Tensor, top: torch.Tensor, finite: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 agreement as 0/1, KL(p || q) in nats) per image, NaN where either output is not finite."""
    log_q = torch.log_softmax(other.to(torch.float64), dim=1)
    agree = (log_q.argmax(dim=1) == top).to(torch.float64)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    ok = finite & torch.isfinite(other).all(dim=1)
    nan = torch.full_like(kl, math.nan)
    return torch.where(ok, agree, nan), torch.where(ok, kl, nan)


def prediction_values(reference: torch.Tensor, moved: torch.Tensor, other: torch.Tensor,
                      roundtrip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image :data:`PREDICTION_QUANTITIES`, each (B,) float64, from (B, K) class scores.

    ``reference`` f(x), ``moved`` f(g x), ``other`` f(x') of the chance
    partner, ``roundtrip`` f(g^-1 g x) (``None`` for g exact on the grid:
    floor agreement 1, KL 0). KL is KL(p(x) || p(.)) in nats. Images whose
    scores are not finite get NaN (and are left out of the statistics).
    """
    for name, tensor in (("moved", moved), ("other", other), ("roundtrip", roundtrip)):
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(f"{name} scores must have the reference's shape {tuple(reference.shape)}, got {tuple(tensor.shape)}")
    if reference.ndim != 2:
        raise ValueError(f"class scores must be (B, K), got {tuple(reference.shape)}")
    log_p = torch.log_softmax(reference.to(torch.float64), dim=1)
    top = log_p.argmax(dim=1)
    finite = torch.isfinite(reference).all(dim=1)
    agreement, kl = compare_predictions(log_p, top, finite, moved)
    chance_agreement, chance_kl = compare_predictions(log_p, top, finite, other)
    if roundtrip is None:
        floor_agreement, floor_kl = compare_predictions(log_p, top, finite, reference)  # exactly 1 and 0 where finite
    else:
        floor_agreement, floor_kl = compare_predictions(log_p, top, finite, roundtrip)
    return {"prediction_agreement": agreement, "prediction_kl": kl,
            "prediction_agreement_chance": chance_agreement, "prediction_kl_chance": chance_kl,
            "prediction_agreement_floor": floor_agreement, "prediction_kl_floor": floor_kl}


class PredictionMeter:
    """Streaming statistics of :func:`prediction_values` per transform (one :class:`AlignmentStatistic` each).

    ``update`` takes one batch's :class:`~alignscope.inputs.pairs.OutputPair` s;
    ``states`` are the float64 tensors to sum across processes; ``rows``
    builds the output rows of the table.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)
        self.stats = {(t.spec, t.sweep): AlignmentStatistic(PREDICTION_QUANTITIES, proportions=AGREEMENT_QUANTITIES)
                      for t in self.transforms}
        self.nonfinite = {key: torch.zeros(1, dtype=torch.float64) for key in self.stats}

    def update(self, pairs: Sequence[OutputPair]) -> list[tuple[Transform, dict[str, torch.Tensor]]]:
        """Add one batch; returns (transform, per-image values) for each pair (for per-image rows)."""
        measured = []
        for pair in pairs:
            values = prediction_values(pair.reference, pair.moved, pair.other, pair.roundtrip)
            key = (pair.transform.spec, pair.transform.sweep)
            self.stats[key].update(values)
            self.nonfinite[key] += (~torch.isfinite(values["prediction_agreement"])).sum().to(torch.float64).cpu()
            measured.append((pair.transform, values))
        return measured

    def states(self) -> list[torch.Tensor]:
        return [*(stat.state for stat in self.stats.values()), *self.nonfinite.values()]

    def rows(self, model: str, name: str, depth: int, classes: int, image_size: Sequence[int], mask_mode: str,
             pretrained: bool, n_calibration: int | None = None) -> list[dict]:
        """One output row per transform (the layer rows' identity columns where they apply; see the module docstring)."""
        height, width = (int(v) for v in image_size)
        records = []
        for transform in self.transforms:
            key = (transform.spec, transform.sweep)
            result = self.stats[key].compute()
            record = {
                "model": model, "layer": name, "depth": depth, "module": "model output", "channels": classes,
                "height": 1, "width": 1, "stride": math.nan, "transform": transform.spec,
                "exact": bool(transform.exact_on(height, width, 1.0)),
                "n_images": int(result["prediction_agreement_n"]), "n_nonfinite": int(self.nonfinite[key].item()),
                "mask": "disk" if uses_disk(transform, mask_mode) else "none", "sweep": transform.sweep,
                "magnitude": transform.magnitude, "pretrained": pretrained, "kind": OUTPUT_KIND,
            }
            for quantity in ("prediction_agreement", "prediction_kl"):
                for suffix in ("", "_ci_low", "_ci_high"):
                    record[f"{quantity}{suffix}"] = result[f"{quantity}{suffix}"]
            for quantity in ("prediction_agreement_chance", "prediction_kl_chance", "prediction_agreement_floor",
                             "prediction_kl_floor"):
                record[quantity] = result[quantity]
            if n_calibration is not None:
                record["n_calibration"] = n_calibration
            records.append(record)
        return records


def image_rows(model: str, name: str, transform: Transform, names: Sequence[str], values: dict[str, torch.Tensor]) -> list[dict]:
    """Per-image rows of the output row (``per_image.csv``): agreement as 0/1, KL in nats."""
    arrays = {k: v.cpu().numpy() for k, v in values.items()}
    return [{"model": model, "layer": name, "transform": transform.spec, "sweep": transform.sweep, "image": image}
            | {k: float(arrays[k][i]) for k in arrays} for i, image in enumerate(names)]
