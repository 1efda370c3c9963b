"""The placement passes of :func:`~alignscope.engine.analysis.analyze` (``placement=True``).

One forward pass per (layer, transform, alignment) and batch: g x is fed, the layer's output is
replaced by its aligned map (:mod:`alignscope.model.substitute`) and the model's output kept
(B, K); nothing else of the pass is held. Per batch and transform one more pass may run for the
input placement, f(g⁻¹ g x), where neither the measuring pass's round trip nor f(x) itself is
it. The statistics are :class:`~alignscope.measure.placement.PlacementMeter`'s.

Alignments (``placed_by``): ``inverse`` (g⁻¹, the layer rows' aligned map) always; ``registered``
(g⁻¹ on the layer's measured lattice, the registered comparison's map) where g is interpolated on a
layer that has a lattice (elsewhere it is the ``inverse`` map itself); with fits,
the searched warp (``optimal``, ``optimal_affine``) and g⁻¹ followed by the fitted channel map
(``channel_map``, ``permutation``), fitted on the calibration images as the layer columns are.
"""
from __future__ import annotations

import logging

import torch

from ..errors import LayerError, first_line
from ..geometry.transforms import Transform
from ..geometry.warping import inverse_warp
from ..inputs.pairs import LayerPair, OutputPair, PairFeeder, uses_disk
from ..inputs.pairs import keep_disk
from ..measure.placement import INPUT_PLACEMENT, PlacementMeter
from ..model.capture import FeatureCapture
from ..model.substitute import MapSubstitution

log = logging.getLogger("alignscope")

#: fitted quantity (see :meth:`~alignscope.fit.fitting.PairFit.aligned_maps`) -> ``placed_by``
FITTED_PLACEMENTS = {"optimal_plain": "optimal", "optimal_affine_plain": "optimal_affine",
                     "channel_mapped": "channel_map", "permuted": "permutation"}


class PlacementRunner:
    """Runs the placement passes of one batch and hands their outputs to ``meter`` once f(x) is known."""

    def __init__(self, feeder: PairFeeder, capture: FeatureCapture, substitution: MapSubstitution,
                 meter: PlacementMeter) -> None:
        self.feeder, self.capture, self.substitution, self.meter = feeder, capture, substitution, meter
        self._moved: tuple[tuple[str, str], torch.Tensor] | None = None
        self._placed: list[tuple[str, str, Transform, torch.Tensor]] = []  # (place, placed_by, transform, (B, K))

    def place(self, pair: LayerPair, x: torch.Tensor, fitted: dict[str, torch.Tensor] | None = None) -> None:
        """The placement passes of ``pair`` (its layer, its transform) for the batch ``x``; ``fitted``: the
        fits' maps of the pair (:meth:`~alignscope.fit.fitting.PairFit.aligned_maps`)."""
        layer, transform = pair.layer, pair.transform
        if layer.name in self.meter.skipped:
            return
        key = (transform.spec, transform.sweep)
        if self._moved is None or self._moved[0] != key:
            self._moved = (key, self.feeder.moved_input(x, transform))  # the batch's g x, one transform at a time
        maps = {"inverse": pair.aligned}
        if pair.registered is not None and pair.residual is None:  # g⁻¹ resampled at the lattice's own points
            maps["registered"] = pair.registered
        for quantity, placed_by in FITTED_PLACEMENTS.items():
            value = (fitted or {}).get(quantity)
            if isinstance(value, torch.Tensor) and value.ndim == 4:
                maps[placed_by] = value
        for placed_by, aligned in maps.items():
            try:
                with self.substitution.replacing(layer, aligned):
                    scores = self.feeder.output_of(self.capture, self._moved[1])
            except LayerError as exc:
                self.meter.skipped[layer.name] = f"cannot place an STN there: {first_line(exc)}"
                log.warning("placement at %s left out: %s", layer.name, first_line(exc))
                return
            self._placed.append((layer.name, placed_by, transform, scores))

    def finish(self, x: torch.Tensor, outputs: list[OutputPair]) -> None:
        """Score the batch's placements against f(x) (the output pairs of the measuring pass) and add the input's."""
        for output in outputs:
            transform = output.transform
            for place, placed_by, placed_transform, scores in self._placed:
                if placed_transform is transform:
                    self.meter.update(place, placed_by, transform, output.reference, scores)
            self.meter.update(INPUT_PLACEMENT, "inverse", transform, output.reference,
                              self._input_round_trip(x, transform, output))
        self._placed.clear()
        self._moved = None

    def _input_round_trip(self, x: torch.Tensor, transform: Transform, output: OutputPair) -> torch.Tensor:
        """f(g⁻¹ g x): the measuring pass's round trip where it made one, f(x) where g⁻¹ g x is x, else one pass."""
        if output.roundtrip is not None:
            return output.roundtrip
        feeder = self.feeder
        source = keep_disk(x, feeder.image_disk, feeder.fill) if uses_disk(transform, feeder.mask_mode) else x
        with feeder.timer("warping"):
            back = inverse_warp(feeder.moved_input(x, transform), transform, 1.0, feeder.fill)
        if torch.equal(back, source):  # flips, quarter turns, the identity: g only permuted pixels
            return output.reference
        return feeder.output_of(self.capture, back)  # e.g. a translation: the border g moved out is lost
