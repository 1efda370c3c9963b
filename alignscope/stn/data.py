"""Data for the STN experiments: upright digits, transformed on the fly.

Sources (``--data``), all offline:

- ``digits``: scikit-learn's 1797 handwritten digits; each 8 x 8 digit (values
  0..16) is upsampled bilinearly to 20 x 20, scaled to [0, 1] and padded with
  4 black pixels on every side (28 x 28). Split 70/30, stratified by class,
  fixed by ``data_seed``.
- ``mnist:DIR``: the standard MNIST IDX files in DIR (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally ``.gz``); their own train/test split. Nothing is downloaded.
- ``folder:DIR``: one sub-folder per class (any image files), read as
  grayscale 28 x 28; split as ``digits``.

Transforms (``task``): ``rotate`` by an angle drawn uniformly in [-90, 90]
degrees (counter-clockwise on screen, as ``alignscope``'s ``rotateA``) or
``scale`` by a zoom in [0.5, 1], about the centre, bilinear, with border
padding (the edge pixel repeats outside the image). Training images get a
fresh draw for every sample in every epoch from a seeded generator
(:class:`TrainStream`); the test set is ``passes`` fixed, seeded random
transforms of every test image (:class:`FixedTestSet`), so accuracies are means
over several random passes and every run sees the same test images.
"""
from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageError, UsageError

TASKS = ("rotate", "scale")
SIZE = 28
PADDING_MODE = "border"


@dataclass
class UprightData:
    """Upright images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or images.shape[1:] != (1, SIZE, SIZE) or len(images) != len(labels):
                raise ImageError(f"{self.source}: {split} images must be (N, 1, {SIZE}, {SIZE}) with one label each; "
                                 f"got {tuple(images.shape)} and {len(labels)} labels")
            if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
                raise ImageError(f"{self.source}: {split} images must be finite and in [0, 1]")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise ImageError(f"{self.source}: {split} labels must lie in 0..{len(self.classes) - 1}")


# ----------------------------------------------------------------------------------------------- sources

def _digits(arg: str | None, data_seed: int) -> UprightData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    images, labels = F.pad(big, (4, 4, 4, 4)), torch.as_tensor(digits.target, dtype=torch.long)
    return _split(images, labels, [str(i) for i in range(10)], data_seed, "scikit-learn digits")


def _folder(arg: str | None, data_seed: int) -> UprightData:
    from PIL import Image

    from ..inputs.images import IMAGE_SUFFIXES

    root = Path(arg or "")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ImageError(f"{arg} needs one sub-folder per class (at least 2); got {len(classes)}")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as img:
                    gray = img.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                images.append(torch.tensor(np.array(gray), dtype=torch.float32) / 255.0)
                labels.append(label)
    if len(images) < 10:
        raise ImageError(f"{arg} holds {len(images)} images; need at least 10")
    return _split(torch.stack(images).unsqueeze(1), torch.as_tensor(labels), classes, data_seed, f"folder {arg}")


def _split(images: torch.Tensor, labels: torch.Tensor, classes: list[str], data_seed: int, source: str,
           test_fraction: float = 0.3) -> UprightData:
    """Stratified split: ``floor(test_fraction * n)`` (at least 1) of each class to test, chosen by the seed."""
    generator = torch.Generator().manual_seed(data_seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_mask[members[: max(1, math.floor(len(members) * test_fraction))]] = True
    return UprightData(images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask], classes, source)


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
             0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (plain or gzip) as an array: magic 0x0000TTDD (type TT, DD dimensions), big-endian sizes."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ImageError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ImageError(f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ImageError(f"{path}: header says shape {shape} ({expected} bytes in all), the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ImageError(f"{folder} has no {stem}[.gz]; an MNIST folder holds train-images-idx3-ubyte, "
                     "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)")


def _mnist(arg: str | None, data_seed: int) -> UprightData:
    folder = Path(arg or "")
    if not folder.is_dir():
        raise ImageError(f"mnist:{arg}: {arg!r} is not a folder; use --data mnist:DIR with the four IDX files in DIR")
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE) or images.dtype != np.uint8:
            raise ImageError(f"mnist:{arg}: {prefix} images must be uint8 N x {SIZE} x {SIZE}; got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ImageError(f"mnist:{arg}: {prefix} has {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ImageError(f"mnist:{arg}: {prefix} labels must lie in 0..9; got {labels.min()}..{labels.max()}")
        splits.append((torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
                       torch.from_numpy(labels.astype(np.int64))))
    (train_x, train_y), (test_x, test_y) = splits
    return UprightData(train_x, train_y, test_x, test_y, [str(i) for i in range(10)], f"MNIST {folder}")


SOURCES: dict[str, Callable[[str | None, int], UprightData]] = {"digits": _digits, "mnist": _mnist, "folder": _folder}


def canonical_spec(spec: str) -> str:
    """``spec`` with its folder made absolute (``mnist:../data`` -> ``mnist:/home/me/data``), so that a saved run
    names its data wherever it is read back; ``digits`` unchanged."""
    name, _, arg = spec.partition(":")
    return f"{name}:{Path(arg).expanduser().resolve()}" if arg else spec


def load_data(spec: str = "digits", data_seed: int = 0) -> UprightData:
    """Upright data of ``spec``: ``digits``, ``mnist:DIR`` or ``folder:DIR`` (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise UsageError(f"unknown data {spec!r}; use digits, mnist:DIR or folder:DIR")
    if name != "digits" and not arg:
        raise UsageError(f"--data {name} needs a folder: {name}:DIR")
    return SOURCES[name](str(Path(arg).expanduser()) if arg else None, data_seed)


# ------------------------------------------------------------------------------------------- transforms

def random_params(task: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 parameters drawn uniformly: degrees in [-90, 90] (rotate) or zoom in [0.5, 1] (scale)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return u * 180.0 - 90.0 if task == "rotate" else 0.5 + 0.5 * u


def task_matrices(task: str, params: torch.Tensor) -> torch.Tensor:
    """(B,) parameters -> (B, 2, 3) float64 *forward* matrices (original point -> where it lands), normalized coords.

    Rotation by A degrees counter-clockwise on screen (y points down): [[cos A, sin A], [-sin A, cos A]];
    zoom S: S times the identity. Square images, so normalized and pixel rotations agree.
    """
    params = params.to(torch.float64)
    zero = torch.zeros_like(params)
    if task == "rotate":
        a = torch.deg2rad(params)
        c, s = torch.cos(a), torch.sin(a)
        rows = [torch.stack([c, s, zero], 1), torch.stack([-s, c, zero], 1)]
    else:
        rows = [torch.stack([params, zero, zero], 1), torch.stack([zero, params, zero], 1)]
    return torch.stack(rows, 1)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine maps -> their inverses (B, 2, 3)."""
    linear_inv = torch.linalg.inv(matrix[:, :, :2])
    return torch.cat([linear_inv, -(linear_inv @ matrix[:, :, 2:])], dim=2)


def apply_task(images: torch.Tensor, task: str, params: torch.Tensor, padding_mode: str = PADDING_MODE) -> torch.Tensor:
    """Transform each image (B, C, H, W) by its own parameter; bilinear, ``align_corners=False``."""
    sampling = invert_affine(task_matrices(task, params)).to(images.dtype)  # output point -> input point
    grid = F.affine_grid(sampling, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def scale_strength(task: str, params: torch.Tensor, strength: float) -> torch.Tensor:
    """Shrink parameters towards the identity: angle x strength, zoom 1 + (zoom - 1) x strength (strength in [0, 1])."""
    return params * strength if task == "rotate" else 1.0 + (params - 1.0) * strength


class TrainStream:
    """Endless seeded batches of the training images, each with a fresh random transform.

    Each epoch is a new permutation; every sample of every batch gets its own
    parameter drawn when the batch is made, so no transformed image is seen
    twice. The same seed gives the same batches. ``strength`` (1 by default,
    set by the training loop for a ramp) shrinks the drawn parameters towards
    the identity (:func:`scale_strength`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, task: str, batch_size: int, seed: int) -> None:
        if task not in TASKS:
            raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.images, self.labels, self.task, self.batch_size = images, labels, task, min(batch_size, len(labels))
        self.generator = torch.Generator().manual_seed(seed)
        self.strength = 1.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            order = torch.randperm(len(self.labels), generator=self.generator)
            # full batches only: a last small batch would weigh a few samples heavily
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                index = order[start: start + self.batch_size]
                params = scale_strength(self.task, random_params(self.task, len(index), self.generator), self.strength)
                yield apply_task(self.images[index], self.task, params), self.labels[index], params


@dataclass
class FixedTestSet:
    """``passes`` fixed random transforms of each upright test image: ``params`` is (passes, N) float64."""

    upright: torch.Tensor
    labels: torch.Tensor
    params: torch.Tensor
    task: str

    @classmethod
    def make(cls, upright: torch.Tensor, labels: torch.Tensor, task: str, passes: int, seed: int) -> "FixedTestSet":
        if passes < 1:
            raise UsageError(f"test passes must be at least 1, got {passes}")
        generator = torch.Generator().manual_seed(seed)
        params = torch.stack([random_params(task, len(labels), generator) for _ in range(passes)])
        return cls(upright, labels, params, task)

    @property
    def passes(self) -> int:
        return self.params.shape[0]

    def batches(self, batch_size: int = 512) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(pass, upright, transformed, labels, params) batches; images made on the fly (memory stays one batch)."""
        for p in range(self.passes):
            for start in range(0, len(self.labels), batch_size):
                upright = self.upright[start: start + batch_size]
                params = self.params[p, start: start + batch_size]
                yield p, upright, apply_task(upright, self.task, params), self.labels[start: start + batch_size], params
