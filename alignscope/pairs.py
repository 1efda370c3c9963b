"""Feature-map pairs: one image batch through the model for every transform.

For a batch x, a transform g and a layer F this yields a = F(x), b = F(g x),
b' = g^-1 b, the round trip F(g^-1 g x) the interpolation floor needs (only
when g is not exact on the pixel grid), the chance partner of each image and
the layer's valid mask. The engine's measuring pass and the calibration pass
of the fitted alignments both read pairs from here, so they see the same
tensors.

Chance pairs image i with image i-1 of the same batch (the first with the
last); a final batch of one image is paired with the previous batch's last
image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import ImageError
from .hooks import FeatureCapture, LayerInfo
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
    what a warp brings in from outside the image.
    """

    def __init__(self, layers: list[LayerInfo], transforms: list[Transform], mask: str, fill: Sequence[float],
                 image_size: tuple[int, int], device: torch.device) -> None:
        self.layers, self.transforms, self.mask_mode, self.fill = layers, transforms, mask, list(fill)
        self.device = device
        self.masks: dict[tuple[str, str, bool], torch.Tensor] = {}
        self.image_disk = disk_mask(*image_size, device=device)
        self._previous_last: dict[tuple[bool, str], torch.Tensor] = {}

    def reset_partners(self) -> None:
        """Forget the last image of the previous batch (start of a new, separate image set)."""
        self._previous_last.clear()

    def mask_for(self, layer: LayerInfo, transform: Transform, disk: bool, height: int, width: int) -> torch.Tensor:
        key = (layer.name, transform.spec, disk)
        if key not in self.masks:
            self.masks[key] = valid_mask(transform, height, width, float(layer.stride or 1), disk, self.device)
        return self.masks[key]

    def pairs(self, x: torch.Tensor, capture: FeatureCapture) -> Iterator[LayerPair]:
        """All (transform, layer) pairs of the batch ``x`` (normalized images on the device)."""
        n = x.shape[0]
        references: dict[bool, dict[str, torch.Tensor]] = {}
        partners: dict[bool, dict[str, torch.Tensor]] = {}
        for transform in self.transforms:
            disk = uses_disk(transform, self.mask_mode)
            x0 = x if not disk else keep_disk(x, self.image_disk, self.fill)
            if disk not in references:
                references[disk] = capture(x0)
                partners[disk] = {name: self._partner(a, (disk, name)) for name, a in references[disk].items()}
            reference = references[disk]
            roundtrip = None
            if transform.is_identity:
                moved = reference
            elif is_exact(transform, x.shape, 1.0):
                moved = capture(warp(x0, transform, 1.0, self.fill))
            else:
                xt = warp(x0, transform, 1.0, self.fill)
                both = capture(torch.cat([xt, inverse_warp(xt, transform, 1.0, self.fill)]))
                moved = {k: v[:n] for k, v in both.items()}
                roundtrip = {k: v[n:] for k, v in both.items()}
            for layer in self.layers:
                a, b = reference[layer.name], moved[layer.name]
                stride = float(layer.stride or 1)
                yield LayerPair(
                    layer=layer, transform=transform, disk=disk, reference=a, moved=b,
                    aligned=inverse_warp(b, transform, stride), other=partners[disk][layer.name],
                    mask=self.mask_for(layer, transform, disk, a.shape[-2], a.shape[-1]),
                    roundtrip=None if roundtrip is None else roundtrip[layer.name],
                )
        for disk, reference in references.items():
            for name, a in reference.items():
                self._previous_last[(disk, name)] = a[-1:].clone()

    def _partner(self, a: torch.Tensor, key: tuple[bool, str]) -> torch.Tensor:
        if a.shape[0] >= 2:
            return torch.roll(a, shifts=1, dims=0)
        previous = self._previous_last.get(key)
        if previous is None:
            raise ImageError("a batch of one image has no partner for the chance distance; use a batch size of at least 2")
        return previous
