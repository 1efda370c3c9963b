"""Fitted alignments: calibrate on some images, measure on the others.

``analyze(..., optimal=..., channel_map=...)`` splits the images (after the
seeded shuffle) into a calibration split and a held-out split. The
calibration split feeds :class:`Calibrator`, which keeps the maps the warp
search needs and the channel statistics; :meth:`Calibrator.fit` returns one
:class:`PairFit` per (layer, transform). The held-out split is then measured
as usual, and each :class:`PairFit` adds its aligned maps as extra
quantities. No held-out image reaches a fit, so every fitted error is an
out-of-sample number, comparable with ``aligned_error`` on the same images.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .channels import CHANNEL_MAPS, ChannelStatistic, apply_linear, apply_permutation, choose_ridge
from ..errors import UsageError
from ..columns import FIT_QUANTITIES
from ..inputs.pairs import LayerPair
from .search import SEARCH_KINDS, WarpFit, analytic_matrix, charged_sq_distance, sample_with, search_warps

log = logging.getLogger("alignscope")

MIN_IMAGES_FOR_FITS = 8
MIN_PER_SPLIT = 4


def _as_choices(value: str | Sequence[str] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"{what} must be one of {', '.join(allowed)}; got {', '.join(map(repr, bad))}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class FitRequest:
    """Which fitted alignments to add; empty tuples add none."""

    optimal: tuple[str, ...] = ()
    channel_map: tuple[str, ...] = ()
    ridge: float | None = None  # None: chosen by two-fold cross-validation on the calibration images
    search_steps: int = 60
    calibration_images: int | None = None
    smoothing_control: bool = True  # charge searched warps for the smoothing of resampling (see warpsearch)

    @classmethod
    def build(cls, optimal=None, channel_map=None, ridge: float | str | None = "auto", search_steps: int = 60,
              calibration_images: int | None = None) -> "FitRequest":
        if ridge == "auto" or ridge is None:
            ridge = None
        elif not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
            raise UsageError(f"ridge must be 'auto' or a finite number >= 0, got {ridge!r}")
        if search_steps < 0:
            raise UsageError(f"search steps must be >= 0, got {search_steps}")
        request = cls(_as_choices(optimal, SEARCH_KINDS, "optimal"), _as_choices(channel_map, CHANNEL_MAPS, "channel_map"),
                      ridge, search_steps, calibration_images)
        if calibration_images is not None and not request.active:
            raise UsageError("calibration images are only used by fitted alignments; add --optimal or --channel-map, "
                             "or drop --calibration-images")
        return request

    @property
    def active(self) -> bool:
        return bool(self.optimal or self.channel_map)

    @property
    def quantities(self) -> tuple[str, ...]:
        return tuple(q for k in (*self.optimal, *self.channel_map) for q in FIT_QUANTITIES[k])

    def split(self, n_images: int) -> tuple[int, int]:
        """(calibration, held-out) image counts; refuses when either would be too small."""
        if n_images < MIN_IMAGES_FOR_FITS:
            raise UsageError(
                f"fitted alignments (--optimal/--channel-map) need at least {MIN_IMAGES_FOR_FITS} images to fit on one "
                f"half and report on the other, got {n_images}; pass more images or drop these options")
        wanted = self.calibration_images if self.calibration_images is not None else min(16, n_images // 2)
        if wanted < MIN_PER_SPLIT or n_images - wanted < MIN_PER_SPLIT:
            raise UsageError(
                f"{wanted} calibration images of {n_images} leaves too few on one side; each split needs at least {MIN_PER_SPLIT}")
        return wanted, n_images - wanted


@dataclass
class PairFit:
    """The fitted alignments of one (layer, transform)."""

    family: WarpFit | None = None
    affine: WarpFit | None = None
    linear: torch.Tensor | None = None
    permutation: torch.Tensor | None = None
    permutation_correlation: torch.Tensor | None = None
    ridge: float | None = None
    ridge_scores: dict | None = None
    circular: bool = False
    analytic: np.ndarray | None = None  # g^-1's sampling matrix, which the searched warps are charged against
    permutation_calibration: dict | None = None

    def aligned_maps(self, pair: LayerPair) -> dict[str, torch.Tensor]:
        """What each fit compares with ``pair.reference`` on held-out images, keyed by quantity name.

        A (B, C, h, w) map (compared with the reference like b'), or for a searched warp's charged error
        the (B,) squared distances already measured (see :func:`~alignscope.fit.search.charged_sq_distance`).
        """
        out = {}
        for name, fit in (("optimal", self.family), ("optimal_affine", self.affine)):
            if fit is None:
                continue
            plain = sample_with(pair.moved, fit.matrix, self.circular)
            out[f"{name}_plain"] = plain
            out[name] = plain if not fit.smoothing_control else charged_sq_distance(
                pair.reference, pair.moved, pair.aligned, pair.mask, fit.matrix, self.analytic, self.circular)
        if self.linear is not None:
            out["channel_mapped"] = apply_linear(pair.aligned, self.linear)
        if self.permutation is not None:
            out["permuted"] = apply_permutation(pair.aligned, self.permutation)
        return out

    def columns(self) -> dict:
        """Table columns describing the fits (the errors themselves come from the held-out statistics)."""
        out = {}
        if self.family is not None:
            out.update(optimal_transform=self.family.spec, optimal_calibration_error=self.family.loss ** 0.5,
                       optimal_plain_calibration_error=self.family.plain_loss ** 0.5,
                       analytic_calibration_error=self.family.analytic_loss ** 0.5)
        if self.affine is not None:
            out.update(optimal_affine_matrix=self.affine.spec, analytic_calibration_error=self.affine.analytic_loss ** 0.5)
        if self.linear is not None:
            out.update(channel_map_ridge=self.ridge)
        if self.permutation is not None:
            moved = int((self.permutation != torch.arange(len(self.permutation))).sum())
            out.update(permuted_channels=moved, permutation_mean_correlation=float(self.permutation_correlation.mean()))
        return out

    def as_json(self) -> dict:
        out: dict = {}
        for fit in (self.family, self.affine):
            if fit is not None:
                out[fit.kind] = {"transform": fit.spec, "sampling_matrix": fit.matrix[:2].tolist(), "params": fit.params,
                                 "smoothing_control": fit.smoothing_control,
                                 "calibration_rms_error": fit.loss ** 0.5, "plain_calibration_rms_error": fit.plain_loss ** 0.5,
                                 "analytic_calibration_rms_error": fit.analytic_loss ** 0.5}
        if self.permutation is not None:
            out["permutation"] = {"b_channel_for_a_channel": self.permutation.tolist(),
                                  "correlation": [round(float(v), 6) for v in self.permutation_correlation],
                                  "calibration_relative_squared_error": self.permutation_calibration}
        if self.linear is not None:
            out["linear"] = {"shape": list(self.linear.shape), "frobenius_norm": float(self.linear.norm()), "ridge": self.ridge,
                             "ridge_cv_relative_error": {str(k): v for k, v in (self.ridge_scores or {}).items()}}
        return out


@dataclass
class _Collected:
    references: list[torch.Tensor] = field(default_factory=list)
    moved: list[torch.Tensor] = field(default_factory=list)
    chance: list[torch.Tensor] = field(default_factory=list)
    mask: torch.Tensor | None = None
    halves: list[ChannelStatistic] = field(default_factory=list)


class Calibrator:
    """Collects calibration pairs, then fits every requested alignment.

    The warp search needs the maps themselves (kept on the device for the
    calibration split only); channel maps need only their statistics.
    ``image_size`` (H, W): where given, a layer with a measured lattice also
    starts the warp search from g^-1 applied on that lattice (the registered
    warp), next to g^-1 in the centred frame.
    """

    def __init__(self, request: FitRequest, image_size: Sequence[int] | None = None) -> None:
        self.request = request
        self.image_size = None if image_size is None else tuple(int(v) for v in image_size)
        self.collected: dict[tuple[str, str, str], _Collected] = {}
        self.pairs: dict[tuple[str, str, str], LayerPair] = {}
        self.seconds = {"warp_search": 0.0, "channel_maps": 0.0}  # what :meth:`fit` spent on each kind

    def update(self, pair: LayerPair) -> None:
        key = (pair.layer.name, pair.transform.spec, pair.transform.sweep)
        slot = self.collected.setdefault(key, _Collected(mask=pair.mask))
        self.pairs[key] = pair
        if self.request.optimal:
            mask = pair.mask.to(pair.reference.dtype)
            slot.references.append(pair.reference)
            slot.moved.append(pair.moved)
            slot.chance.append(((pair.reference - pair.other).square() * mask).sum(dim=(1, 2, 3), dtype=torch.float64).sqrt())
        if self.request.channel_map:
            if not slot.halves:
                slot.halves = [ChannelStatistic(pair.reference.shape[1]) for _ in range(2)]
            # Alternate images between two halves, for the cross-validated ridge.
            for half, stat in enumerate(slot.halves):
                stat.update(pair.reference[half::2], pair.aligned[half::2], pair.mask)

    def _registered_start(self, pair: LayerPair) -> list:
        """g^-1 on the layer's measured lattice as a sampling matrix, when there is one to use."""
        lattice = getattr(pair.layer, "lattice", None)
        if lattice is None or self.image_size is None or pair.transform.is_identity:
            return []
        from ..geometry.warping import registered_sampling_matrix

        matrix = registered_sampling_matrix(pair.transform, lattice, pair.layer.shape[1:], self.image_size)
        return [matrix] if np.isfinite(matrix).all() else []

    def fit(self, progress=None) -> dict[tuple[str, str, str], PairFit]:
        """Every requested fit of every collected (layer, transform); the seconds each kind took go to :attr:`seconds`."""
        fits = {}
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        for done, (key, slot) in enumerate(self.collected.items(), start=1):
            pair = self.pairs[key]
            fit = PairFit(circular=pair.transform.circular)
            started = time.perf_counter()
            if self.request.optimal:
                reference, moved, chance = torch.cat(slot.references), torch.cat(slot.moved), torch.cat(slot.chance)
                found = search_warps(reference, moved, slot.mask, chance, pair.transform, pair.stride,
                                     [kind for kind in SEARCH_KINDS if kind in self.request.optimal],
                                     self.request.search_steps, starts=self._registered_start(pair),
                                     smoothing_control=self.request.smoothing_control)
                fit.family, fit.affine = found.get("family"), found.get("affine")
                fit.analytic = analytic_matrix(pair.transform, *reference.shape[-2:], pair.stride)
                slot.references.clear()
                slot.moved.clear()
            searched = time.perf_counter()
            self.seconds["warp_search"] += searched - started
            if slot.halves:
                first, second = slot.halves
                if "linear" in self.request.channel_map:
                    ridge = self.request.ridge
                    if ridge is None:
                        ridge, fit.ridge_scores = choose_ridge(first, second)
                    fit.ridge = ridge
                merged = ChannelStatistic(first.channels).merge(first).merge(second)
                if "linear" in self.request.channel_map:
                    fit.linear = merged.fit_linear(fit.ridge).to(torch.float32)
                if "permutation" in self.request.channel_map:
                    fit.permutation, fit.permutation_correlation = merged.fit_permutation()
                    total = float(merged.sq_a.sum())
                    fit.permutation_calibration = {
                        "identity": merged.permuted_squared_error(torch.arange(merged.channels)) / total if total > 0 else None,
                        "permuted": merged.permuted_squared_error(fit.permutation) / total if total > 0 else None}
            self.seconds["channel_maps"] += time.perf_counter() - searched
            fits[key] = fit
            if progress is not None:
                progress(done, len(self.collected))
        return fits
