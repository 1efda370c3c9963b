"""Feature-map pairs: one image batch through the model for every transform.

For a batch x, a transform g and a layer F this yields a = F(x), b = F(g x),
b' = g^-1 b, the round trip F(g^-1 g x) the interpolation floor needs (only
when g is not exact on the pixel grid), the chance partner of each image and
the layer's valid mask. The engine's measuring pass and the calibration pass
of the fitted alignments both read pairs from here, so they see the same
tensors.

Chance pairs image i with image i-1 of the whole seeded image order (the
first image with the second). Each batch carries the image before its first
one as :attr:`~alignscope.images.ImageBatch.partner`, which runs through the
model with the batch's reference pass (one image more per batch). Pairs, and
so every number, therefore depend only on the image order: not on the batch
size, the worker count or which process handles which batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import ImageError
from .hooks import FeatureCapture, LayerInfo
from .timing import NULL_TIMER
from .transforms import Transform
from .warping import disk_mask, inverse_warp, is_exact, valid_mask, warp

MASK_MODES = ("auto", "disk", "none")


def uses_disk(transform: Transform, mask: str) -> bool:
    """Disk masking for ``mask='disk'``, or for ``'auto'`` when g has a rotation or shear part."""
    return mask == "disk" or (mask == "auto" and transform.has_rotation_or_shear)


def keep_disk(x: torch.Tensor, disk: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Keep the centred disk of each image and paint the rest black (``fill`` after normalization)."""
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return fill_t + (x - fill_t) * disk


@dataclass
class LayerPair:
    """The tensors of one (layer, transform) for one batch; maps are (B, C, h, w)."""

    layer: LayerInfo
    transform: Transform
    disk: bool
    reference: torch.Tensor
    moved: torch.Tensor
    aligned: torch.Tensor
    other: torch.Tensor
    mask: torch.Tensor
    roundtrip: torch.Tensor | None

    @property
    def stride(self) -> float:
        return float(self.layer.stride or 1)


class PairFeeder:
    """Turns image batches into :class:`LayerPair` s, caching masks and chance partners.

    ``fill`` is the per-channel value of black after normalization; it fills
    what a warp brings in from outside the image. ``amp`` (``torch.bfloat16``
    or ``torch.float16``) runs the model under autocast; its maps are turned
    back into float32 before any warp or norm. ``channels_last`` feeds the
    model NHWC tensors.
    """

    def __init__(self, layers: list[LayerInfo], transforms: list[Transform], mask: str, fill: Sequence[float],
                 image_size: tuple[int, int], device: torch.device, timer=NULL_TIMER, amp: torch.dtype | None = None,
                 channels_last: bool = False) -> None:
        self.layers, self.transforms, self.mask_mode, self.fill = layers, transforms, mask, list(fill)
        self.device = device
        self.timer = timer
        self.amp, self.channels_last = amp, channels_last
        self.masks: dict[tuple[str, str, bool], torch.Tensor] = {}
        self.image_disk = disk_mask(*image_size, device=device)

    def _forward(self, capture: FeatureCapture, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.timer("forward"):
            if self.amp is None:
                return capture(x)
            with torch.autocast(self.device.type, dtype=self.amp):
                maps = capture(x)
            return {name: value.float() for name, value in maps.items()}

    def mask_for(self, layer: LayerInfo, transform: Transform, disk: bool, height: int, width: int) -> torch.Tensor:
        """The valid mask; equal masks are one tensor object, so quantities that depend only on
        (reference, partner, mask) can be shared between transforms (see :func:`~alignscope.metrics.reference_terms`)."""
        key = (layer.name, transform.spec, disk)
        if key not in self.masks:
            mask = valid_mask(transform, height, width, float(layer.stride or 1), disk, self.device)
            for (name, _, other_disk), known in self.masks.items():
                if name == layer.name and other_disk == disk and torch.equal(known, mask):
                    mask = known
                    break
            self.masks[key] = mask
        return self.masks[key]

    def model_inputs(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> Iterator[tuple[Transform, bool, str, torch.Tensor | None]]:
        """The batches the model is fed for the batch ``x``, as ``(transform, disk, kind, batch)``.

        ``kind`` is ``"reference"`` (x, disk-masked for disk transforms; with
        the carried ``partner`` appended when there is one), yielded before the
        first transform that needs it, then ``"moved"`` (g x, exact) or
        ``"moved+roundtrip"`` (g x and g^-1 g x stacked) for each transform;
        ``batch`` is ``None`` for the identity, whose maps are the reference's.
        """
        n = x.shape[0]
        if n < 2 and partner is None:
            raise ImageError("a batch of one image has no partner for the chance distance; use at least 2 images")
        inputs: dict[bool, torch.Tensor] = {}
        for transform in self.transforms:
            disk = uses_disk(transform, self.mask_mode)
            if disk not in inputs:
                with self.timer("warping"):
                    inputs[disk] = x if not disk else keep_disk(x, self.image_disk, self.fill)
                    batch = inputs[disk]
                    if partner is not None:
                        extra = partner.to(x.device)
                        batch = torch.cat([batch, extra if not disk else keep_disk(extra, self.image_disk, self.fill)])
                yield transform, disk, "reference", batch
            if transform.is_identity:
                yield transform, disk, "moved", None
                continue
            with self.timer("warping"):
                xt = warp(inputs[disk], transform, 1.0, self.fill)
                exact = is_exact(transform, x.shape, 1.0)
                batch = xt if exact else torch.cat([xt, inverse_warp(xt, transform, 1.0, self.fill)])
            yield transform, disk, "moved" if exact else "moved+roundtrip", batch

    def pairs(self, x: torch.Tensor, capture: FeatureCapture, partner: torch.Tensor | None = None) -> Iterator[LayerPair]:
        """All (transform, layer) pairs of the batch ``x`` (normalized images on the device).

        ``partner`` (1, 3, H, W) is the image before the batch's first image in the
        whole order (``None`` only for the batch that starts it; a batch of one image
        always needs one).
        """
        n = x.shape[0]
        references: dict[bool, dict[str, torch.Tensor]] = {}
        partners: dict[bool, dict[str, torch.Tensor]] = {}
        for transform, disk, kind, batch in self.model_inputs(x, partner):
            if kind == "reference":
                maps = self._forward(capture, batch)
                references[disk] = {name: v[:n] for name, v in maps.items()}
                # image i's partner is image i-1; the first image's is the carried partner (or image 1)
                first = slice(n, n + 1) if partner is not None else slice(1, 2)
                partners[disk] = {name: torch.cat([v[first], v[: n - 1]]) for name, v in maps.items()}
                continue
            reference = references[disk]
            roundtrip = None
            if batch is None:
                moved = reference
            else:
                maps = self._forward(capture, batch)
                moved = {k: v[:n] for k, v in maps.items()}
                if kind == "moved+roundtrip":
                    roundtrip = {k: v[n:] for k, v in maps.items()}
            for layer in self.layers:
                a, b = reference[layer.name], moved[layer.name]
                with self.timer("warping"):
                    aligned = inverse_warp(b, transform, float(layer.stride or 1))
                    mask = self.mask_for(layer, transform, disk, a.shape[-2], a.shape[-1])
                yield LayerPair(
                    layer=layer, transform=transform, disk=disk, reference=a, moved=b, aligned=aligned,
                    other=partners[disk][layer.name], mask=mask,
                    roundtrip=None if roundtrip is None else roundtrip[layer.name],
                )
