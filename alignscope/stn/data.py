"""Offline data for the STN experiments: scikit-learn's handwritten digits, rotated or scaled.

Each 8 x 8 digit (values 0..16) is upsampled bilinearly to 20 x 20, scaled to
[0, 1] and padded with 4 black pixels on every side (28 x 28, room to rotate
and shrink). Task ``rotate``: a random rotation in [-90, 90] degrees; task
``scale``: a random zoom in [0.5, 1] (both about the centre, bilinear, seeded
per image). The split is fixed by ``seed``: 70% train, 30% test, stratified by
class. A folder with one sub-folder per class (any image files) can be used
instead; its images are read as grayscale 28 x 28.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageError, UsageError
from ..transforms import Part, Transform

TASKS = ("rotate", "scale")
SIZE = 28


@dataclass
class DigitSplits:
    """Upright and transformed images (N, 1, 28, 28) in [0, 1], labels and the parameters applied."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_upright: torch.Tensor
    test_params: torch.Tensor
    classes: list[str]
    task: str


def _upright_digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return F.pad(big, (4, 4, 4, 4)), torch.as_tensor(digits.target, dtype=torch.long), [str(i) for i in range(10)]


def _folder_images(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    from ..images import IMAGE_SUFFIXES

    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ImageError(f"{folder} needs one sub-folder per class (at least 2); got {len(classes)}")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as img:
                    gray = img.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                images.append(torch.tensor(np.array(gray), dtype=torch.float32) / 255.0)
                labels.append(label)
    if len(images) < 10:
        raise ImageError(f"{folder} holds {len(images)} images; need at least 10")
    return torch.stack(images).unsqueeze(1), torch.as_tensor(labels), classes


def random_params(task: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image parameters: degrees in [-90, 90] (rotate) or zoom in [0.5, 1] (scale)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return u * 180.0 - 90.0 if task == "rotate" else 0.5 + 0.5 * u


def apply_task(images: torch.Tensor, task: str, params: torch.Tensor) -> torch.Tensor:
    """Rotate or zoom each image by its own parameter (bilinear, black outside), as :func:`alignscope.warp` does."""
    height, width = images.shape[-2:]
    sampling = []
    for value in params.tolist():
        part = Part("rotate", (value,)) if task == "rotate" else Part("scale", (value,))
        sampling.append(np.linalg.inv(Transform((part,)).matrix(height, width))[:2])
    theta = torch.as_tensor(np.stack(sampling), dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def load_splits(task: str = "rotate", seed: int = 0, images: str | Path | None = None, test_fraction: float = 0.3) -> DigitSplits:
    """The fixed, seeded train/test split of the task (see module docstring)."""
    if task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    upright, labels, classes = _upright_digits() if images is None else _folder_images(images)
    generator = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_mask[members[: max(1, math.floor(len(members) * test_fraction))]] = True
    params = random_params(task, len(labels), generator)
    transformed = apply_task(upright, task, params)
    return DigitSplits(
        train_images=transformed[~test_mask], train_labels=labels[~test_mask],
        test_images=transformed[test_mask], test_labels=labels[test_mask],
        test_upright=upright[test_mask], test_params=params[test_mask], classes=classes, task=task,
    )
