"""What is fed to the model, said once: :class:`PairOptions`.

The transforms, the images and how they are batched, masked, sampled and decoded. Like
:class:`~alignscope.model.options.ModelOptions`, one object is built and validated in one place
(:meth:`PairOptions.build`: a bad value fails before any model loads) and every entry point
(``analyze``, ``explain``, ``benchmark``, the commands) takes it or builds it from keywords.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..errors import ImageError, UsageError, UsageTypeError
from ..geometry.transforms import Transform, as_transforms
from ..model.build import DataConfig
from .images import ImageSource, ImageStream, discover_images, image_stream
from .pairs import MASK_MODES, PairFeeder


def _whole(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(f"{name} must be a whole number, got {value!r}")


def validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UsageError(f"seed must be an integer from 0 to 2**32 - 1, got {seed!r}")


@dataclass(frozen=True, eq=False)
class PairOptions:
    """Image / transformed-image pairs: which transforms, which images, in which batches.

    ``transforms``: parsed transforms, or ``None`` for the default set (chosen against the
    deepest selected layer's stride when the model is known, see :meth:`resolve_transforms`).
    ``images``: a folder, file, glob, list of paths, ``None`` (the bundled photos) or a
    normalized float tensor N x C x H x W. ``mask``: ``auto`` | ``disk`` | ``none``.
    ``seed`` orders the images and so picks the chance partners; ``max_images`` caps them
    (a seeded sample); ``workers`` decode images in that many processes.
    """

    transforms: tuple[Transform, ...] | None = None
    images: ImageSource = None
    batch_size: int = 16
    mask: str = "auto"
    seed: int = 0
    max_images: int | None = None
    workers: int = 0

    @classmethod
    def build(cls, transforms: Sequence[str | Transform] | str | Transform | None = None, images: ImageSource = None,
              batch_size: int = 16, mask: str = "auto", seed: int = 0, max_images: int | None = None,
              workers: int = 0) -> "PairOptions":
        """Validate every setting once; a transform typo fails here, before the model loads."""
        _whole("batch_size", batch_size)
        _whole("workers", workers)
        _whole("seed", seed)
        if max_images is not None:
            _whole("max_images", max_images)
        if not (transforms is None or isinstance(transforms, (str, Transform)) or (
                isinstance(transforms, (list, tuple)) and all(isinstance(t, (str, Transform)) for t in transforms))):
            raise UsageTypeError(f"transforms must be a spec string (e.g. 'rot90'), a Transform, or a list of them; got "
                                 f"{transforms!r}")
        if mask not in MASK_MODES:
            raise UsageError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        validate_seed(seed)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise UsageError(f"workers must be >= 0, got {workers}")
        parsed = None if transforms is None else tuple(as_transforms(transforms))
        if images is not None and not isinstance(images, torch.Tensor) and not (
                isinstance(images, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in images)):
            found = discover_images(images, max_images, seed)  # a missing folder fails now, not after the model loads
            if len(found) < 2:
                raise ImageError(f"need at least 2 images (chance compares different images), {images} holds "
                                 f"{len(found)}; pass a folder with more images")
        return cls(parsed, images, batch_size, mask, seed, max_images, workers)

    def resolve_transforms(self, deepest_stride: float) -> list[Transform]:
        """The transforms to measure: the given ones, or the default set for a model this deep."""
        return as_transforms(list(self.transforms) if self.transforms is not None else None, deepest_stride)

    def with_transforms(self, transforms: Sequence[Transform]) -> "PairOptions":
        return replace(self, transforms=tuple(transforms))

    def stream(self, cfg: DataConfig, device: torch.device) -> ImageStream:
        """The images prepared for ``cfg``; at least two (chance compares different images)."""
        stream = image_stream(self.images, cfg, self.batch_size, self.max_images, self.seed, workers=self.workers,
                              pin_memory=device.type == "cuda")
        if len(stream) < 2:
            raise ImageError(f"need at least 2 images (chance compares different images), got {len(stream)}")
        return stream

    def feeder(self, layers, transforms: Sequence[Transform], cfg: DataConfig, device: torch.device, **kwargs) -> PairFeeder:
        """A :class:`PairFeeder` filling warped-in borders with black (after normalization); ``kwargs`` as for it."""
        return PairFeeder(list(layers), list(transforms), self.mask, black_fill(cfg), tuple(cfg.input_size[1:]), device,
                          **kwargs)

    def as_json(self) -> dict:
        images = self.images
        source = "bundled photos" if images is None else ("tensor" if isinstance(images, torch.Tensor) else str(images))
        return {"mask": self.mask, "batch_size": self.batch_size, "seed": self.seed, "max_images": self.max_images,
                "images_source": source, "workers": self.workers}


def black_fill(cfg: DataConfig) -> list[float]:
    """The normalized value of a black pixel per channel: what a warp fills uncovered input with."""
    return [-m / s for m, s in zip(cfg.mean, cfg.std)]
