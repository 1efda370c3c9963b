"""Feature-map pairs: one image batch through the model for every transform.

For a batch x, a transform g and a layer F this yields a = F(x), b = F(g x),
b' = g^-1 b, the round trip F(g^-1 g x) the interpolation floor needs (only
when g is not exact on the pixel grid), the chance partner of each image and
the layer's valid mask. The engine's measuring pass and the calibration pass
of the fitted alignments both read pairs from here, so they see the same
tensors.

Chance pairs image i with image i-1 of the whole seeded image order (the
first image with the second). Each batch carries the image before its first
one as :attr:`~alignscope.inputs.images.ImageBatch.partner`, which runs through the
model with the batch's reference pass (one image more per batch). Pairs, and
so every number, therefore depend only on the image order: not on the batch
size, the worker count or which process handles which batch.

Registration (a layer with a measured :class:`~alignscope.model.lattice_probe.Lattice`):
g^-1 is also applied in the layer's own lattice coordinates. For g exact on
the grid, b' is compared with F(tau_r x), tau_r moving x by the grid
residual -r (one extra forward per distinct residual and batch, none when
every residual is 0), on the cells whose support no padding reaches; for
other g, b is resampled at the lattice points g(L q). See
:func:`registered_mask` and :mod:`alignscope.geometry.warping`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import ImageError
from ..model.capture import MODEL_OUTPUT, FeatureCapture, LayerInfo
from ..runtime.timing import NULL_TIMER
from ..geometry.transforms import Transform
from ..geometry.warping import (
    disk_mask, grid_residual, interior_mask, inverse_warp, is_exact, registered_sampling_matrix, registered_valid_mask,
    registration_shift, sample_affine, valid_mask, warp,
)

log = logging.getLogger("alignscope")

MASK_MODES = ("auto", "disk", "none")
Residual = tuple[float, float]


def layer_residual(layer: LayerInfo, transform: Transform, image_size: Sequence[int]) -> Residual | None:
    """The grid residual of ``transform`` on ``layer``'s lattice, ``None`` if g is not exact there or no lattice."""
    if layer.lattice is None or layer.shape is None:
        return None
    return grid_residual(transform, layer.lattice, layer.shape[1:], image_size, float(layer.stride or 1))


def registered_mask(layer: LayerInfo, transform: Transform, image_size: Sequence[int], disk: bool,
                    plain: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The mask of the registered comparison and how it was made (``"valid"``, ``"interior"`` or ``"valid, border"``).

    Residual 0: ``plain`` (the comparison is the centred one). Residual r != 0:
    ``plain`` and the cells whose measured support lies inside the image;
    where no such cell exists (supports as large as the image) ``plain``
    alone, with border effects. Not exact: the lattice warp's own valid mask.
    """
    if layer.lattice is None or layer.shape is None or transform.circular:
        return plain, "valid"
    residual = layer_residual(layer, transform, image_size)
    if residual is None:
        return registered_valid_mask(transform, layer.lattice, layer.shape[1:], image_size, disk, plain.device), "valid"
    if residual == (0.0, 0.0):
        return plain, "valid"
    inside = plain * interior_mask(layer.lattice, residual, layer.shape[1:], image_size, plain.device)
    if bool(inside.any()):
        return inside, "interior"
    return plain, "valid, border"


def uses_disk(transform: Transform, mask: str) -> bool:
    """Disk masking for ``mask='disk'``, or for ``'auto'`` when g has a rotation or shear part."""
    return mask == "disk" or (mask == "auto" and transform.has_rotation_or_shear)


def keep_disk(x: torch.Tensor, disk: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Keep the centred disk of each image and paint the rest black (``fill`` after normalization)."""
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return fill_t + (x - fill_t) * disk


def _format_residual(residual: Residual) -> str:
    return ",".join(f"{v:g}" for v in residual)


def registration_columns(layer: LayerInfo, transform: Transform, image_size: Sequence[int], result: dict,
                         mask: torch.Tensor | None, plain: torch.Tensor | None) -> dict:
    """The table columns of the registered comparison for one (layer, transform).

    ``offset_x``/``offset_y``: the lattice offsets (cell (i, j) at input pixel
    (stride j + offset_x, stride i + offset_y)); ``grid_residual``: "dx,dy" in
    input pixels for g exact on the lattice, "" where g^-1 was interpolated on
    the lattice; ``registered_fraction``: the share of cells the registered
    comparison used (below ``valid_fraction`` where supports reaching
    past the image were left out).
    """
    lattice = layer.lattice
    residual = layer_residual(layer, transform, image_size) if lattice is not None and not transform.circular else None
    if lattice is not None and transform.circular:
        residual = (0.0, 0.0)
    used = mask if mask is not None else plain
    return {
        "offset_x": lattice.offset_x if lattice is not None else float("nan"),
        "offset_y": lattice.offset_y if lattice is not None else float("nan"),
        "grid_residual": _format_residual(residual) if residual is not None else "",
        "registered_error": result["registered_error"],
        "registered_error_ci_low": result["registered_error_ci_low"],
        "registered_error_ci_high": result["registered_error_ci_high"],
        "registered_fraction": float(used.mean()) if used is not None and lattice is not None else float("nan"),
    }


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
    registered_reference: torch.Tensor | None = None
    registered: torch.Tensor | None = None
    registered_mask: torch.Tensor | None = None
    residual: Residual | None = None

    @property
    def stride(self) -> float:
        return float(self.layer.stride or 1)


@dataclass
class OutputPair:
    """The model's own outputs (B, K) for one transform and batch (see :mod:`alignscope.measure.prediction`).

    ``reference`` f(x), ``moved`` f(g x), ``other`` f of each image's chance
    partner, ``roundtrip`` f(g^-1 g x) (``None`` where g is exact).
    """

    transform: Transform
    disk: bool
    reference: torch.Tensor
    moved: torch.Tensor
    other: torch.Tensor
    roundtrip: torch.Tensor | None


def chance_partners(x: torch.Tensor, partner: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's chance partner, (B, C, H, W): image i - 1, the first image's the batch's carried ``partner``
    (1, C, H, W) or, for the batch that starts the order, image 1 (the rule :meth:`PairFeeder.pairs` uses)."""
    first = partner.to(x.device, x.dtype) if partner is not None else x[1:2]
    return torch.cat([first, x[:-1]])


def forward_chunks(batch: torch.Tensor, limit: int) -> list[torch.Tensor]:
    """``batch`` in as few equal chunks of at most ``limit`` images as possible (the last may be smaller).

    The analysis feeds g x with its round trip g^-1 g x stacked (2n images
    for a batch of n): fed at most n + 1 at a time, one batch's activations
    are alive at once, which bounds the peak memory.
    """
    count = -(-batch.shape[0] // limit)
    return list(batch.split(-(-batch.shape[0] // count)))


class PairFeeder:
    """Turns image batches into :class:`LayerPair` s, caching masks and chance partners.

    ``fill`` is the per-channel value of black after normalization; it fills
    what a warp brings in from outside the image. ``amp`` (``torch.bfloat16``
    or ``torch.float16``) runs the model under autocast; its maps are turned
    back into float32 before any warp or norm. ``channels_last`` feeds the
    model NHWC tensors. When the capture returns the model's output too
    (:data:`~alignscope.model.capture.MODEL_OUTPUT`), :attr:`output_pairs` holds the
    :class:`OutputPair` s of the batch last fed through :meth:`pairs`.
    """

    def __init__(self, layers: list[LayerInfo], transforms: list[Transform], mask: str, fill: Sequence[float],
                 image_size: tuple[int, int], device: torch.device, timer=NULL_TIMER, amp: torch.dtype | None = None,
                 channels_last: bool = False) -> None:
        self.layers, self.transforms, self.mask_mode, self.fill = layers, transforms, mask, list(fill)
        self.device = device
        self.timer = timer
        self.amp, self.channels_last = amp, channels_last
        self.masks: dict[tuple[str, str, bool], torch.Tensor] = {}
        self.registered_masks: dict[tuple[str, str, bool], torch.Tensor] = {}
        # (layer, transform) -> residual shift where the registered comparison keeps border effects
        self.border_shifts: dict[tuple[str, str], Residual] = {}
        self.image_size = tuple(int(v) for v in image_size)
        self.image_disk = disk_mask(*image_size, device=device)
        self.output_pairs: list[OutputPair] = []
        self._users: dict[Residual, tuple[set[str], int]] | None = None

    def _forward(self, capture: FeatureCapture, x: torch.Tensor, limit: int | None = None,
                 phase: str = "forward") -> dict[str, torch.Tensor]:
        """The captured maps of ``x``, fed in :func:`forward_chunks` of at most ``limit`` images; the time
        counts as ``phase``."""
        if limit is not None and x.shape[0] > limit:
            parts = [self._forward(capture, chunk, phase=phase) for chunk in forward_chunks(x, limit)]
            return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.timer(phase):
            if self.amp is None:
                return {name: value.float() for name, value in capture(x).items()}  # no copy when already float32
            with torch.autocast(self.device.type, dtype=self.amp):
                maps = capture(x)
            return {name: value.float() for name, value in maps.items()}

    def output_of(self, capture: FeatureCapture, batch: torch.Tensor) -> torch.Tensor:
        """The model's output (B, K) for ``batch``, fed as the measuring pass feeds it (autocast, memory format);
        no layer is captured (see :meth:`~alignscope.model.capture.FeatureCapture.output_only`)."""
        with capture.output_only():
            return self._forward(capture, batch, phase="placement")[MODEL_OUTPUT]

    def moved_input(self, x: torch.Tensor, transform: Transform) -> torch.Tensor:
        """g x exactly as :meth:`model_inputs` feeds it (disk-masked first where ``transform`` uses the disk)."""
        with self.timer("warping"):
            source = keep_disk(x, self.image_disk, self.fill) if uses_disk(transform, self.mask_mode) else x
            return source if transform.is_identity else warp(source, transform, 1.0, self.fill)

    def mask_for(self, layer: LayerInfo, transform: Transform, disk: bool, height: int, width: int) -> torch.Tensor:
        """The valid mask; equal masks are one tensor object, so quantities that depend only on
        (reference, partner, mask) can be shared between transforms (see :func:`~alignscope.measure.metrics.reference_terms`)."""
        key = (layer.name, transform.spec, disk)
        if key not in self.masks:
            mask = valid_mask(transform, height, width, float(layer.stride or 1), disk, self.device)
            for (name, _, other_disk), known in self.masks.items():
                if name == layer.name and other_disk == disk and torch.equal(known, mask):
                    mask = known
                    break
            self.masks[key] = mask
        return self.masks[key]

    def registered_mask_for(self, layer: LayerInfo, transform: Transform, disk: bool, plain: torch.Tensor) -> torch.Tensor:
        """:func:`registered_mask`, cached; the plain mask object itself where they agree (shared chance terms)."""
        key = (layer.name, transform.spec, disk)
        if key not in self.registered_masks:
            mask, how = registered_mask(layer, transform, self.image_size, disk, plain)
            if how == "valid, border":
                self.border_shifts[(layer.name, transform.spec)] = layer_residual(layer, transform, self.image_size)
                # one caveat for all of them in the report's warnings (registered_border), not a line each here
                log.debug("%s / %s: every cell's support reaches past the image, so the registered comparison keeps "
                            "the border effects of the %s px shift there (registered_fraction = valid_fraction)",
                            layer.name, transform.spec, layer_residual(layer, transform, self.image_size))
            self.registered_masks[key] = plain if torch.equal(mask, plain) else mask
        return self.registered_masks[key]

    def _shifts_needed(self, transform: Transform, disk: bool, done: set) -> list[tuple[bool, Residual]]:
        """Residual shifts of ``transform`` not yet fed for this batch (``done`` is updated)."""
        needed = []
        for layer in self.layers:
            residual = None if transform.circular else layer_residual(layer, transform, self.image_size)
            if residual is not None and residual != (0.0, 0.0) and (disk, residual) not in done:
                done.add((disk, residual))
                needed.append((disk, residual))
        return needed

    def model_inputs(self, x: torch.Tensor, partner: torch.Tensor | None = None, controls: bool = True
                     ) -> Iterator[tuple[Transform, bool, str, torch.Tensor | None]]:
        """The batches the model is fed for the batch ``x``, as ``(transform, disk, kind, batch)``.

        ``kind`` is ``"reference"`` (x, disk-masked for disk transforms; with
        the carried ``partner`` appended when there is one), yielded before the
        first transform that needs it, then ``"moved"`` (g x, exact) or
        ``"moved+roundtrip"`` (g x and g^-1 g x stacked) for each transform;
        ``batch`` is ``None`` for the identity, whose maps are the reference's.
        Then ``"registered"``: tau_r x for the residuals r of this transform
        not fed before in this batch, stacked in :meth:`_shifts_needed` order.
        ``controls=False`` leaves out the round trips (the floor) and the
        registered shifts: only x, its partner and g x are fed.
        """
        n = x.shape[0]
        if n < 2 and partner is None:
            raise ImageError("a batch of one image has no partner for the chance distance; use at least 2 images")
        inputs: dict[bool, torch.Tensor] = {}
        shifted: set = set()
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
                exact = is_exact(transform, x.shape, 1.0) or not controls
                batch = xt if exact else torch.cat([xt, inverse_warp(xt, transform, 1.0, self.fill)])
            yield transform, disk, "moved" if exact else "moved+roundtrip", batch
            shifts = self._shifts_needed(transform, disk, shifted) if controls else []
            if shifts:
                with self.timer("warping"):
                    # zero fill: what the network's own zero padding shows beyond the image
                    batch = torch.cat([warp(inputs[disk], registration_shift(r), 1.0, 0.0) for _, r in shifts])
                yield transform, disk, "registered", batch

    def pairs(self, x: torch.Tensor, capture: FeatureCapture, partner: torch.Tensor | None = None,
              controls: bool = True) -> Iterator[LayerPair]:
        """All (transform, layer) pairs of the batch ``x`` (normalized images on the device).

        ``partner`` (1, 3, H, W) is the image before the batch's first image in the
        whole order (``None`` only for the batch that starts it; a batch of one image
        always needs one). ``controls=False`` (the calibration pass, which needs only
        a, b, g^-1 b and the partner): no round trips and no registered comparison,
        so their forward passes are not run and those fields of the pairs are empty.
        """
        n = x.shape[0]
        self.output_pairs = []
        references: dict[bool, dict[str, torch.Tensor]] = {}
        partners: dict[bool, dict[str, torch.Tensor]] = {}
        shifted_maps: dict[tuple[bool, Residual], dict[str, torch.Tensor]] = {}
        shifted: set = set()
        pending: list[tuple[Transform, bool, dict, torch.Tensor | None]] = []
        for transform, disk, kind, batch in self.model_inputs(x, partner, controls):
            if kind == "registered":
                users = self._shift_users()
                for index, key in enumerate(self._shifts_needed(transform, disk, shifted)):
                    # only the layers that compare against this shift, and the forward pass stops after them
                    with capture.restricted(users[key[1]][0]):
                        shifted_maps[key] = self._forward(capture, batch[index * n:(index + 1) * n])
                continue
            yield from self._emit(pending, references, partners, shifted_maps, controls)
            pending = []
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
                maps = self._forward(capture, batch, n + 1)
                moved = {k: v[:n] for k, v in maps.items()}
                if kind == "moved+roundtrip":
                    roundtrip = {k: v[n:] for k, v in maps.items()}
            # held back until the transform's residual shifts (the next input, if any) have run
            pending = [(transform, disk, moved, roundtrip)]
        yield from self._emit(pending, references, partners, shifted_maps, controls)

    def _shift_users(self) -> dict[Residual, tuple[set[str], int]]:
        """Per residual shift: the layers that compare against it, and the index of the last transform that does."""
        if self._users is None:
            self._users = {}
            for position, transform in enumerate(self.transforms):
                if transform.circular:
                    continue
                for layer in self.layers:
                    residual = layer_residual(layer, transform, self.image_size)
                    if residual is not None and residual != (0.0, 0.0):
                        names, _ = self._users.get(residual, (set(), 0))
                        self._users[residual] = (names | {layer.name}, position)
        return self._users

    def _emit(self, pending: list, references: dict, partners: dict, shifted_maps: dict,
              controls: bool = True) -> Iterator[LayerPair]:
        for transform, disk, moved, roundtrip in pending:
            yield from self._emit_one(transform, disk, moved, roundtrip, references, partners, shifted_maps, controls)
            # a shift no later transform compares against is dropped: one batch's maps, not all of its shifts
            position = next(i for i, known in enumerate(self.transforms) if known is transform)
            for key in [key for key in shifted_maps if self._shift_users()[key[1]][1] <= position]:
                del shifted_maps[key]

    def _emit_one(self, transform: Transform, disk: bool, moved: dict, roundtrip: dict | None, references: dict,
              partners: dict, shifted_maps: dict, controls: bool) -> Iterator[LayerPair]:
        reference = references[disk]
        for layer in self.layers:
            a, b = reference[layer.name], moved[layer.name]
            with self.timer("warping"):
                aligned = inverse_warp(b, transform, float(layer.stride or 1))
                mask = self.mask_for(layer, transform, disk, a.shape[-2], a.shape[-1])
                registered = self._register(layer, transform, disk, a, b, aligned, mask, shifted_maps) \
                    if controls else {}
            yield LayerPair(
                layer=layer, transform=transform, disk=disk, reference=a, moved=b, aligned=aligned,
                other=partners[disk][layer.name], mask=mask,
                roundtrip=None if roundtrip is None else roundtrip[layer.name], **registered,
            )
        if MODEL_OUTPUT in moved:
            self.output_pairs.append(OutputPair(
                transform, disk, reference[MODEL_OUTPUT], moved[MODEL_OUTPUT], partners[disk][MODEL_OUTPUT],
                None if roundtrip is None else roundtrip[MODEL_OUTPUT]))

    def _register(self, layer: LayerInfo, transform: Transform, disk: bool, a: torch.Tensor, b: torch.Tensor,
                  aligned: torch.Tensor, mask: torch.Tensor, shifted_maps: dict) -> dict:
        """The registered comparison's fields of :class:`LayerPair` (none without a lattice)."""
        if layer.lattice is None:
            return {}
        residual = None if transform.circular else layer_residual(layer, transform, self.image_size)
        registered_mask_ = self.registered_mask_for(layer, transform, disk, mask)
        if transform.circular or residual == (0.0, 0.0):
            # a roll moves every lattice alike, and a zero residual is the centred comparison itself
            return dict(registered_reference=a, registered=aligned, registered_mask=registered_mask_, residual=residual or (0.0, 0.0))
        if residual is not None:
            return dict(registered_reference=shifted_maps[(disk, residual)][layer.name], registered=aligned,
                        registered_mask=registered_mask_, residual=residual)
        matrix = registered_sampling_matrix(transform, layer.lattice, a.shape[-2:], self.image_size)
        return dict(registered_reference=a, registered=sample_affine(b, matrix, 0.0), registered_mask=registered_mask_, residual=None)
