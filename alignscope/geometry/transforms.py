"""Spatial transforms of images and feature maps, and the ``--transform`` grammar.

Coordinate convention (used everywhere in alignscope)
-----------------------------------------------------
Normalized coordinates: origin at the image centre, x to the right, y down,
the outer edges of the corner pixels at x, y = +-1, pixel centres at
(2 i + 1) / W - 1 (PyTorch's ``align_corners=False``). A transform g is an
invertible affine map of these coordinates, stored as a 3 x 3 float64 matrix
that sends a point p of the original image to the point g(p) where that
content sits in the transformed image. Geometric parameters are defined in
pixel units (a rotation is a true rotation on a non-square image): the
matrix is built in pixel-centred coordinates and conjugated with
``diag(W/2, H/2)`` of the image, so a feature map with the image's aspect
ratio uses the same normalized matrix.

- ``rotateA``: A degrees counter-clockwise as seen on screen;
- ``scaleS``: zoom about the centre (S > 1 enlarges the content);
- ``translateX,Y`` / ``rollX,Y``: move content by X, Y input pixels
  (right, down), with zero fill / with circular wrap-around;
- ``shearA``: x-shear, x' = x + tan(A) y;
- ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``, ``identity``: exact.

``a+b`` applies a then b. ``rotate:-90:90:15`` is a sweep (inclusive).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import TransformSpecError

log = logging.getLogger("alignscope")

GRAMMAR_HELP = """\
transform specs (repeat --transform for several):
  rotate30, rotate-45      rotate by degrees, counter-clockwise on screen
  scale0.7, scale1.5       zoom about the centre
  translate16,-8           shift by input pixels (x right, y down), zero fill
  roll16,-8                shift with circular wrap-around
  shear15                  x-shear by degrees
  hflip vflip rot90 rot180 rot270 identity     exact on the pixel grid
  rotate30+scale0.8        composition, applied left to right
  rotate:-90:90:15         sweep start:stop:step (inclusive); also scale:, translate:, shear:"""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
MAX_DEGREES = 1e6  # float64 keeps sub-arcsecond precision here; beyond it an angle stops meaning anything
MIN_SCALE = 1e-6  # and at most 1e6: beyond that no cell of any map keeps content
_COMPOSE = re.compile(r"(?<![eE])\+")  # '+' composes, except as an exponent's sign (1e+3)


def spec_number(value: float) -> str:
    """The canonical spelling of a parameter: exact, so a canonical spec parses back bit for bit.

    Whole numbers print as integers (never in exponent form, whose '+' would read as a
    composition); others as Python's shortest round-trip repr (which may use 'e-').
    """
    value = float(value)
    if value == 0:
        return "0"
    if value.is_integer():
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Part:
    """One primitive transform; ``values`` are its parameters in spec units."""

    kind: str
    values: tuple[float, ...] = ()

    @property
    def spec(self) -> str:
        if self.kind in ("translate", "roll"):
            return f"{self.kind}{spec_number(self.values[0])},{spec_number(self.values[1])}"
        if self.kind == "rot90":
            return {0: "identity", 1: "rot90", 2: "rot180", 3: "rot270"}[int(self.values[0]) % 4]
        return self.kind + "".join(spec_number(v) for v in self.values)

    def inverse(self) -> "Part":
        if self.kind in ("rotate", "shear"):
            return Part(self.kind, (-self.values[0],))
        if self.kind == "scale":
            return Part("scale", (1.0 / self.values[0],))
        if self.kind in ("translate", "roll"):
            return Part(self.kind, (-self.values[0], -self.values[1]))
        if self.kind == "rot90":
            return Part("rot90", ((-int(self.values[0])) % 4,))
        return self  # identity, hflip, vflip are their own inverses

    def pixel_matrix(self) -> np.ndarray:
        """3 x 3 matrix in pixel-centred coordinates (x right, y down, pixel units)."""
        m = np.eye(3)
        if self.kind == "rotate" or self.kind == "rot90":
            angle = math.radians(self.values[0] if self.kind == "rotate" else 90 * int(self.values[0]))
            c, s = round(math.cos(angle), 15), round(math.sin(angle), 15)
            m[:2, :2] = [[c, s], [-s, c]]  # counter-clockwise on screen, y pointing down
        elif self.kind == "scale":
            m[0, 0] = m[1, 1] = self.values[0]
        elif self.kind in ("translate", "roll"):
            m[0, 2], m[1, 2] = self.values
        elif self.kind == "shear":
            m[0, 1] = math.tan(math.radians(self.values[0]))
        elif self.kind == "hflip":
            m[0, 0] = -1
        elif self.kind == "vflip":
            m[1, 1] = -1
        return m

    def exact_on(self, height: int, width: int, stride: float = 1) -> bool:
        """Whether this part maps the cell centres of an H x W grid of ``stride`` onto each other."""
        if self.kind in ("identity", "hflip", "vflip"):
            return True
        if self.kind == "rot90":
            return int(self.values[0]) % 2 == 0 or height == width
        if self.kind in ("translate", "roll"):
            return all(_is_multiple(v, stride) for v in self.values)
        return False


def _is_multiple(value: float, stride: float) -> bool:
    if stride <= 0:
        return False
    cells = value / stride
    return abs(cells - round(cells)) < 1e-9


@dataclass(frozen=True)
class Transform:
    """An invertible affine transform made of primitive parts applied left to right.

    ``sweep`` names the sweep a transform came from (``""`` if none) and
    ``magnitude`` its swept value.
    """

    parts: tuple[Part, ...]
    sweep: str = ""
    magnitude: float = field(default=float("nan"), compare=False)

    @property
    def spec(self) -> str:
        return "+".join(p.spec for p in self.parts) if self.parts else "identity"

    def __str__(self) -> str:
        return self.spec

    @property
    def is_identity(self) -> bool:
        return all(p.kind == "identity" for p in self.parts)

    @property
    def circular(self) -> bool:
        return any(p.kind == "roll" for p in self.parts)

    @property
    def has_rotation_or_shear(self) -> bool:
        return any(p.kind in ("rotate", "shear") and p.values[0] % 360 != 0 for p in self.parts)

    def inverse(self) -> "Transform":
        return Transform(tuple(p.inverse() for p in reversed(self.parts)), self.sweep, self.magnitude)

    def matrix(self, height: int, width: int) -> np.ndarray:
        """3 x 3 float64 matrix in normalized coordinates for an image of ``height`` x ``width``."""
        pixel = np.eye(3)
        for part in self.parts:
            pixel = part.pixel_matrix() @ pixel
        to_normalized = np.diag([2.0 / width, 2.0 / height, 1.0])
        return to_normalized @ pixel @ np.linalg.inv(to_normalized)

    def exact_on(self, height: int, width: int, stride: float = 1) -> bool:
        return all(p.exact_on(height, width, stride) for p in self.parts)

    def total_shift(self) -> tuple[float, float]:
        """Summed (x, y) pixel shift of a transform made only of translations/rolls."""
        return (sum(p.values[0] for p in self.parts if p.kind in ("translate", "roll")),
                sum(p.values[1] for p in self.parts if p.kind in ("translate", "roll")))


# --- the grammar -------------------------------------------------------------

_PRIMITIVES: dict[str, tuple[re.Pattern[str], Callable[[re.Match[str]], Part]]] = {}


def register_primitive(pattern: str, build: Callable[[re.Match[str]], Part]) -> None:
    """Teach the spec parser a new primitive: a full-match regex and a Part builder."""
    _PRIMITIVES[pattern] = (re.compile(pattern), build)


register_primitive(r"identity", lambda m: Part("identity"))
register_primitive(r"hflip", lambda m: Part("hflip"))
register_primitive(r"vflip", lambda m: Part("vflip"))
register_primitive(r"rot(90|180|270)", lambda m: Part("rot90", (int(m.group(1)) // 90,)))
register_primitive(rf"rotate({_NUMBER})", lambda m: Part("rotate", (float(m.group(1)),)))
register_primitive(rf"shear({_NUMBER})", lambda m: Part("shear", (float(m.group(1)),)))
register_primitive(rf"scale({_NUMBER})", lambda m: Part("scale", (float(m.group(1)),)))
register_primitive(rf"translate({_NUMBER}),({_NUMBER})", lambda m: Part("translate", (float(m.group(1)), float(m.group(2)))))
register_primitive(rf"roll({_NUMBER}),({_NUMBER})", lambda m: Part("roll", (float(m.group(1)), float(m.group(2)))))

_SWEEPABLE = {
    "rotate": lambda v: Part("rotate", (v,)),
    "scale": lambda v: Part("scale", (v,)),
    "shear": lambda v: Part("shear", (v,)),
    "translate": lambda v: Part("translate", (v, 0.0)),
}


def _bad(spec: str, why: str) -> TransformSpecError:
    spec = spec if len(spec) <= 60 else spec[:57] + "..."
    return TransformSpecError(f"bad transform {spec!r}: {why}. Examples: rotate30, scale0.8, translate16,-8, rot90, rotate30+scale0.8, rotate:-90:90:15")


def _parse_part(text: str, spec: str) -> Part:
    for pattern, build in _PRIMITIVES.values():
        match = pattern.fullmatch(text)
        if match:
            part = build(match)
            if not all(math.isfinite(v) for v in part.values):
                raise _bad(spec, "numbers must be finite")
            if part.kind in ("rotate", "shear") and abs(part.values[0]) > MAX_DEGREES:
                raise _bad(spec, f"angles beyond +-{MAX_DEGREES:g} degrees are not representable to a pixel's precision")
            if part.kind == "scale" and not MIN_SCALE <= part.values[0] <= 1 / MIN_SCALE:
                raise _bad(spec, f"scale must lie in [{MIN_SCALE:g}, {1 / MIN_SCALE:g}]")
            if part.kind == "scale" and not part.values[0] > 0:
                raise _bad(spec, "scale must be positive")
            if part.kind == "shear" and abs(part.values[0]) >= 90:
                raise _bad(spec, "shear must lie strictly between -90 and 90 degrees")
            if part.kind in ("translate", "roll") and not all(float(v).is_integer() and abs(v) < 2**31 for v in part.values):
                raise _bad(spec, "translations are whole input pixels, less than 2**31 in size")
            return part
    raise _bad(spec, f"unknown part {text!r}")


def _parse_sweep(spec: str) -> list[Transform]:
    family, *numbers = spec.split(":")
    if family not in _SWEEPABLE or len(numbers) != 3:
        raise _bad(spec, f"a sweep is FAMILY:start:stop:step with FAMILY one of {', '.join(_SWEEPABLE)}")
    try:
        start, stop, step = (float(n) for n in numbers)
    except ValueError:
        raise _bad(spec, "start, stop and step must be numbers") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise _bad(spec, "start, stop and step must be finite numbers")
    if step == 0 or (stop - start) / step < 0:
        raise _bad(spec, "step must be non-zero and go from start towards stop")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > 1000:
        raise _bad(spec, f"the sweep has {count} steps; at most 1000")
    values = [round(start + i * step, 10) for i in range(count)]
    transforms = []
    for value in values:
        part = _parse_part(Part(family, (value,) if family != "translate" else (value, 0.0)).spec, spec)
        transforms.append(_checked(Transform((part,), sweep=spec, magnitude=value), spec))
    return transforms


def parse_transform(spec: str) -> list[Transform]:
    """Parse one ``--transform`` spec into one transform, or several for a sweep."""
    text = spec.strip().replace(" ", "")
    if not text:
        raise _bad(spec, "empty spec")
    if ":" in text:
        return _parse_sweep(text)
    parts = tuple(_parse_part(piece, spec) for piece in _COMPOSE.split(text))
    if any(p.kind == "roll" for p in parts) and not all(p.kind in ("roll", "identity") for p in parts):
        raise _bad(spec, "roll (circular shift) combines only with other rolls")
    magnitude = parts[0].values[0] if len(parts) == 1 and parts[0].values else float("nan")
    return [_checked(Transform(parts, magnitude=magnitude), spec)]


def _checked(transform: Transform, spec: str) -> Transform:
    """Refuse transforms whose matrix or its inverse is not finite in float64 (e.g. scale1e-320)."""
    matrix = transform.matrix(64, 64)
    try:
        inverse = np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        inverse = np.full_like(matrix, np.nan)
    if not (np.isfinite(matrix).all() and np.isfinite(inverse).all()):
        raise _bad(spec, "its matrix is not invertible in floating point (a parameter is too large or too small)")
    return transform


def parse_transforms(specs: Iterable[str] | str) -> list[Transform]:
    """Parse several specs; duplicates (by canonical spec and sweep) are kept once."""
    if isinstance(specs, str):
        specs = [specs]
    seen: dict[tuple[str, str], Transform] = {}
    for spec in specs:
        for transform in parse_transform(spec):
            seen.setdefault((transform.spec, transform.sweep), transform)
    if not seen:
        raise TransformSpecError("no transform given; " + GRAMMAR_HELP.splitlines()[0])
    return list(seen.values())


def default_transforms(deepest_stride: float = 32) -> list[Transform]:
    """The default set: exact and translation cases that align, and the paper's hard cases.

    A translation by the deepest stage's stride (aligns at every stage up to
    borders), a 5-pixel one that is no multiple of most strides, rotations,
    rot90, scalings and a horizontal flip.
    """
    stride = int(round(deepest_stride)) if deepest_stride >= 1 else 1
    specs = ["identity", f"translate{stride},0", "translate5,0", "rotate15", "rotate45", "rot90", "scale0.8", "scale1.25", "hflip"]
    return parse_transforms(specs)


def as_transforms(items: Sequence[str | Transform] | str | Transform | None, deepest_stride: float = 32) -> list[Transform]:
    """Normalize API input: ``None`` (defaults), specs, or Transform objects."""
    if items is None:
        return default_transforms(deepest_stride)
    if isinstance(items, (str, Transform)):
        items = [items]
    unique: dict[tuple[str, str], Transform] = {}
    repeated: list[str] = []
    for item in items:
        for transform in [item] if isinstance(item, Transform) else parse_transform(item):
            key = (transform.spec, transform.sweep)
            if key in unique:
                repeated.append(transform.spec)
            unique.setdefault(key, transform)
    if not unique:
        raise TransformSpecError("no transform given")
    if repeated:
        # pooling a transform's images twice would double n_images and shrink its interval
        log.warning("transform%s %s given more than once; each is measured once",
                    "s" if len(set(repeated)) > 1 else "", ", ".join(dict.fromkeys(repeated)))
    return list(unique.values())
