"""Image inputs: the bundled photos, user folders/files/globs, and streaming batches.

Images are read one batch at a time. Every image is converted to 8-bit RGB
(grayscale, palette, RGBA composited over black, 16-bit scaled), rotated by
its EXIF orientation, and prepared by timm's evaluation transform for the
model's :class:`~alignscope.model.build.DataConfig`: shorter side resized to
``input / crop_pct``, centre crop, normalisation with ``mean``/``std``.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from ..model.build import DataConfig

log = logging.getLogger("alignscope")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ImageSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], torch.Tensor, Sequence[torch.Tensor], None]


def bundled_photos() -> list[Path]:
    """The default photos shipped inside the package (see data/photos/SOURCES.md)."""
    folder = resources.files("alignscope") / "data" / "photos"
    return sorted(Path(str(p)) for p in folder.iterdir() if str(p).lower().endswith(IMAGE_SUFFIXES))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def non_image_files(source: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[tuple[str, str]]:
    """(path, reason) for the files in ``source``'s folders that are not images (hidden files aside): they are
    left out, and the report lists them with the unreadable images."""
    if source is None or isinstance(source, torch.Tensor):
        return []
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    found = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            found += [(str(p), f"not an image file (suffix {p.suffix or 'none'}; images are {', '.join(IMAGE_SUFFIXES)})")
                      for p in sorted(Path(item).rglob("*"))
                      if p.is_file() and not _is_image(p) and not any(part.startswith(".") for part in p.parts[-1:])]
    return found


def discover_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None,
    max_images: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Resolve a folder (recursive), file, glob or list of these to sorted image paths.

    ``None`` means the bundled photos. With ``max_images`` smaller than what was
    found, a seeded sample is drawn and returned in sorted order, so the same
    arguments always give the same images.
    """
    if source is None:
        found = bundled_photos()
    else:
        items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        found_set: set[Path] = set()
        for item in items:
            path = Path(item)
            if path.is_dir():
                found_set.update(p for p in path.rglob("*") if _is_image(p))
            elif path.is_file():
                found_set.add(path)
            elif any(ch in str(item) for ch in "*?["):
                found_set.update(Path(p) for p in glob.glob(str(item), recursive=True) if _is_image(Path(p)))
            else:
                raise ImageError(f"no such image file, folder or glob: {item}; pass --images DIR|FILE|GLOB")
        found = sorted(found_set)
    if not found:
        raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {source}; pass --images DIR|FILE|GLOB")
    if max_images is not None:
        if max_images < 1:
            raise ImageError(f"--max-images must be at least 1, got {max_images}")
        if max_images < len(found):
            found = sorted(random.Random(seed).sample(found, max_images))
    return found


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, EXIF orientation applied.

    Raises OSError/ValueError subclasses for unreadable or corrupt files, and
    PIL's DecompressionBombError for images above PIL's pixel limit
    (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels), which would otherwise
    exhaust memory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _read_rgb(path)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def _read_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # forces decoding, so truncated files fail here
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
            array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            img = Image.fromarray(array, mode="L")
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, rgba)
        return img.convert("RGB")


def build_preprocess(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform for ``cfg``: PIL RGB image -> normalized (3, H, W) tensor."""
    from timm.data import create_transform

    return create_transform(
        input_size=cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        is_training=False,
    )


@dataclass
class ImageBatch:
    """Normalized images (B, 3, H, W), the names they came from, and the batch's position.

    Chance pairs each image with the image before it in the whole seeded
    order (the first image with the second), so a batch carries ``partner``
    (1, 3, H, W): the nearest readable image before its first image. Only
    the batch that starts the order has ``None`` (its first image's partner
    is its own second image), unless it holds one image, when the partner is
    the nearest readable image after it.
    """

    pixels: torch.Tensor
    names: list[str]
    index: int = 0
    partner: torch.Tensor | None = None


def _prepare(preprocess, path: Path) -> tuple[torch.Tensor | None, str]:
    try:
        return preprocess(read_rgb(path)), ""
    except Image.DecompressionBombError as exc:
        return None, f"too large to decode safely ({str(exc).splitlines()[0]})"
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as exc:
        return None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class _PreparedImages(torch.utils.data.Dataset):
    """Worker-side reading: one (pixels or None, reason) per path, in order."""

    def __init__(self, paths: list[Path], cfg: DataConfig) -> None:
        self.paths, self.cfg, self._preprocess = paths, cfg, None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self._preprocess is None:
            self._preprocess = build_preprocess(self.cfg)
        return _prepare(self._preprocess, self.paths[index])


@dataclass
class ImageStream:
    """Batches of prepared images, read lazily; unreadable files are skipped and counted.

    Either ``paths`` (read and prepared with ``cfg``) or ``tensor`` (already
    prepared, N x 3 x H x W) is given. Batch k holds the readable images among
    positions [k B, (k+1) B) of the list, so batches (and the chance pairs
    inside them) do not depend on how the work is split: ``shard=(rank,
    world)`` yields only the batches with k % world == rank. ``workers`` > 0
    decodes images in that many worker processes (``pin_memory`` for CUDA).
    """

    cfg: DataConfig
    batch_size: int
    paths: list[Path] | None = None
    tensor: torch.Tensor | None = None
    name_offset: int = 0  # a tensor's images are named tensor[name_offset + i]
    shard: tuple[int, int] = (0, 1)
    workers: int = 0
    pin_memory: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # files of the folders that are not images
    used: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else int(self.tensor.shape[0])  # type: ignore[union-attr]

    @property
    def n_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def owned_batches(self) -> list[int]:
        rank, world = self.shard
        return [k for k in range(self.n_batches) if k % world == rank]

    def __iter__(self) -> Iterator[ImageBatch]:
        self.skipped.clear()
        self.used.clear()
        if self.tensor is not None:
            yield from self._tensor_batches()
        else:
            yield from self._path_batches()

    def _tensor_batches(self) -> Iterator[ImageBatch]:
        assert self.tensor is not None
        for k in self.owned_batches():
            start = k * self.batch_size
            chunk = self.tensor[start : start + self.batch_size]
            names = [f"tensor[{self.name_offset + i}]" for i in range(start, start + chunk.shape[0])]
            self.used.extend(names)
            partner = None
            if start > 0:
                partner = self.tensor[start - 1 : start]
            elif chunk.shape[0] == 1 and len(self) > 1:
                partner = self.tensor[1:2]
            yield ImageBatch(chunk, names, k, partner)

    def _reader(self, positions: list[int]) -> Iterator[tuple[int, torch.Tensor | None, str]]:
        paths = self.paths or []
        if self.workers > 0 and positions:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            if self.workers > cores:
                log.warning("--workers %d is more than the %d CPU cores available here; decoding gets slower, not "
                            "faster: use --workers %d or fewer", self.workers, cores, cores)
            subset = torch.utils.data.Subset(_PreparedImages(paths, self.cfg), positions)
            loader = torch.utils.data.DataLoader(subset, batch_size=None, num_workers=self.workers,
                                                 pin_memory=self.pin_memory, prefetch_factor=4)
            for position, (pixels, reason) in zip(positions, loader):
                yield position, pixels, reason
            return
        preprocess = build_preprocess(self.cfg)
        for position in positions:
            pixels, reason = _prepare(preprocess, paths[position])
            yield position, pixels, reason

    def _path_batches(self) -> Iterator[ImageBatch]:
        paths = self.paths or []
        owned = self.owned_batches()
        positions = [i for k in owned for i in range(k * self.batch_size, min((k + 1) * self.batch_size, len(paths)))]
        current: int | None = None
        pixels: list[torch.Tensor] = []
        names: list[str] = []
        # Read in order by one process, every position before a batch has been seen, so the last
        # readable image read is the partner of the next batch; otherwise it is looked up.
        sequential = self.shard[1] == 1
        previous: torch.Tensor | None = None  # last readable image before the current batch
        last: torch.Tensor | None = None
        for position, image, reason in self._reader(positions):
            k = position // self.batch_size
            if k != current:
                if current is not None and pixels:
                    yield self._batch(current, pixels, names, previous if sequential else None)
                pixels, names = [], []
                previous = last
            current = k
            if image is None:
                self.skipped.append((str(paths[position]), reason))
                log.warning("skipping unreadable image %s: %s", paths[position], reason)
                continue
            pixels.append(image)
            names.append(str(paths[position]))
            last = image
        if current is not None and pixels:
            yield self._batch(current, pixels, names, previous if sequential else None)

    def _batch(self, k: int, pixels: list[torch.Tensor], names: list[str], before: torch.Tensor | None) -> ImageBatch:
        self.used.extend(names)
        if before is not None:
            partner = before.unsqueeze(0)
        elif k > 0 or len(pixels) == 1:
            partner = self._find_partner(k, names[0])
        else:
            partner = None
        return ImageBatch(torch.stack(pixels), names, k, partner)

    def _find_partner(self, k: int, name: str) -> torch.Tensor | None:
        """The nearest readable image before batch k; for the batch that starts the order, the next one after ``name``."""
        paths = self.paths or []
        start = k * self.batch_size
        preprocess = build_preprocess(self.cfg)
        order = list(range(start - 1, -1, -1)) + list(range(start, len(paths)))
        for position in order:
            if str(paths[position]) == name:
                continue
            image, _ = _prepare(preprocess, paths[position])
            if image is not None:
                return image.unsqueeze(0)
        return None


def image_stream(source: ImageSource, cfg: DataConfig, batch_size: int, max_images: int | None = None, seed: int = 0,
                 workers: int = 0, pin_memory: bool = False) -> ImageStream:
    """An :class:`ImageStream` for a path, list of paths, glob, ``None`` (bundled photos) or tensor.

    Paths are read in a seeded random order (``seed``); a tensor in its own order.
    """
    if batch_size < 1:
        raise ImageError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(source, (list, tuple)) and source and all(isinstance(item, torch.Tensor) for item in source):
        # a list of image tensors: C x H x W each (or 1 x C x H x W), stacked in their order
        shapes = {tuple(item.shape[-3:]) for item in source}
        if len(shapes) != 1 or any(item.ndim not in (3, 4) or (item.ndim == 4 and item.shape[0] != 1) for item in source):
            raise ImageError(f"a list of image tensors must hold C x H x W tensors of one size, got shapes "
                             f"{sorted({tuple(item.shape) for item in source})[:4]}")
        source = torch.stack([item.reshape(item.shape[-3:]) for item in source])
    elif isinstance(source, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in source):
        raise ImageError("images mixes tensors and paths; pass either image tensors or paths")
    if isinstance(source, torch.Tensor):
        if source.ndim == 4 and source.shape[0] == 0:
            raise ImageError("the image tensor holds no images (N = 0); pass at least 2 images")
        expected = tuple(cfg.input_size)
        if source.ndim != 4 or tuple(source.shape[1:]) != expected:
            raise ImageError(f"image tensor must be N x {' x '.join(map(str, expected))}, got {tuple(source.shape)}")
        if not torch.is_floating_point(source):
            raise ImageError(f"image tensor must hold normalized floats, got dtype {source.dtype}; convert with "
                             ".float(), scale to [0, 1] and normalize with the model's mean and std")
        tensor = source if max_images is None else source[:max_images]
        finite = torch.isfinite(tensor.detach().reshape(tensor.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ImageError(f"image tensor holds NaN or inf in {len(bad)} of {tensor.shape[0]} images "
                             f"(first: index {bad[0]}); replace or drop them")
        return ImageStream(cfg=cfg, batch_size=batch_size, tensor=tensor.float())
    paths = discover_images(source, max_images, seed)
    # Chance pairs neighbours within a batch: a seeded shuffle keeps files that sort together
    # (video frames, copies) from being each other's "unrelated" image.
    random.Random(seed).shuffle(paths)
    return ImageStream(cfg=cfg, batch_size=batch_size, paths=paths, workers=workers, pin_memory=pin_memory,
                       ignored=non_image_files(source))


def split_stream(stream: ImageStream, first: int) -> tuple[ImageStream, ImageStream]:
    """The first ``first`` images of ``stream`` (in its reading order) and the rest, as two streams."""
    if stream.tensor is not None:
        return (replace(stream, tensor=stream.tensor[:first], skipped=[], used=[]),
                replace(stream, tensor=stream.tensor[first:], name_offset=first, skipped=[], used=[]))
    paths = list(stream.paths or [])
    return replace(stream, paths=paths[:first], skipped=[], used=[]), replace(stream, paths=paths[first:], skipped=[], used=[])
