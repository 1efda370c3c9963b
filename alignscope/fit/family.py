"""g's own family of warps, as the search parametrizes it.

A transform g (see :mod:`alignscope.geometry.transforms`) is a chain of parts; its
family frees each part's number (rotation and shear angles in degrees, a
scale as its logarithm; flips and quarter turns stay as they are, a quarter
turn becoming a free rotation) and adds a free translation in pixels after
the linear part, because striding and asymmetric padding shift a feature
map's centre against the image's by a fraction of a cell. Values map to
pixel matrices (image frame, x right, y down) and to normalized sampling
matrices (``align_corners=False``: the map spans [-1, 1]); search units scale
each parameter so that one unit is a comparable move (5 degrees, 5% of
scale, one cell of translation).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..geometry.transforms import Transform, spec_number

# Search units per parameter kind (translation: one cell of the map, set by the caller).
_UNITS = {"rotate": 5.0, "shear": 5.0, "scale": 0.05}


class WarpFamily:
    """g's family: free linear parameters (in spec units) and a free pixel translation."""

    def __init__(self, transform: Transform, height: int, width: int) -> None:
        self.kinds: list[str] = []  # per linear part: rotate | scale | shear | hflip | vflip
        init: list[float] = []
        for part in transform.parts:
            if part.kind in ("rotate", "shear"):
                self.kinds.append(part.kind)
                init.append(part.values[0])
            elif part.kind == "rot90":
                self.kinds.append("rotate")
                init.append(90.0 * int(part.values[0]))
            elif part.kind == "scale":
                self.kinds.append("scale")
                init.append(math.log(part.values[0]))
            elif part.kind in ("hflip", "vflip"):
                self.kinds.append(part.kind)
        pixel = np.eye(3)
        for part in transform.parts:
            pixel = part.pixel_matrix() @ pixel
        self.free = [i for i, k in enumerate(self.kinds) if k in _UNITS]
        self.init = torch.tensor(init + [pixel[0, 2], pixel[1, 2]], dtype=torch.float64)
        self.height, self.width = height, width

    def units(self, cell: float) -> torch.Tensor:
        return torch.tensor([_UNITS[self.kinds[i]] for i in self.free] + [cell, cell], dtype=torch.float64)

    def pixel_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """(P,) or (K, P) parameter values -> (3, 3) or (K, 3, 3) pixel matrices (differentiable)."""
        rows = values.reshape(-1, values.shape[-1])
        zero, one = torch.zeros_like(rows[:, 0]), torch.ones_like(rows[:, 0])

        def matrix(*entries: torch.Tensor) -> torch.Tensor:
            return torch.stack([*entries, zero, zero, one], dim=-1).reshape(-1, 3, 3)

        m = matrix(one, zero, zero, zero, one, zero)
        free = iter(range(len(self.free)))
        for kind in self.kinds:
            if kind == "rotate":
                angle = torch.deg2rad(rows[:, next(free)])
                c, s = torch.cos(angle), torch.sin(angle)
                part = matrix(c, s, zero, -s, c, zero)
            elif kind == "scale":
                s = torch.exp(rows[:, next(free)])
                part = matrix(s, zero, zero, zero, s, zero)
            elif kind == "shear":
                part = matrix(one, torch.tan(torch.deg2rad(rows[:, next(free)])), zero, zero, one, zero)
            else:  # hflip | vflip
                part = matrix(-one, zero, zero, zero, one, zero) if kind == "hflip" else matrix(one, zero, zero, zero, -one, zero)
            m = part @ m
        shift = torch.stack([zero, zero, rows[:, -2], zero, zero, rows[:, -1], zero, zero, zero], dim=-1)
        m = m + shift.reshape(-1, 3, 3)  # the free translation, in pixels, after the linear part
        return m if values.ndim > 1 else m[0]

    def normalized(self, values: torch.Tensor) -> torch.Tensor:
        """(P,) or (K, P) parameter values -> their normalized sampling matrices, (3, 3) or (K, 3, 3)."""
        to_norm = torch.diag(torch.tensor([2.0 / self.width, 2.0 / self.height, 1.0], dtype=torch.float64))
        from_norm = torch.diag(torch.tensor([self.width / 2.0, self.height / 2.0, 1.0], dtype=torch.float64))
        return to_norm @ self.pixel_matrix(values) @ from_norm

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """The family's parameter values whose normalized matrix is nearest ``matrix`` (least squares, from g's).

        Exact for a matrix in the family, e.g. g^-1 composed with a shift.
        """
        target = torch.as_tensor(matrix, dtype=torch.float64)[:2].reshape(-1)

        def residual(values: torch.Tensor) -> torch.Tensor:
            return self.normalized(values)[:2].reshape(-1) - target

        # Gauss-Newton with step halving: a few parameters, six residuals, nearly linear near g's own values
        values, r = self.init.clone(), residual(self.init)
        for _ in range(100):
            jacobian = torch.autograd.functional.jacobian(residual, values)  # (6, P)
            step = torch.linalg.lstsq(jacobian, -r.unsqueeze(1)).solution.squeeze(1)
            while True:
                trial = values + step
                r_trial = residual(trial)
                if float(r_trial.square().sum()) <= float(r.square().sum()) or float(step.abs().max()) < 1e-15:
                    break
                step = step / 2
            values, r = trial, r_trial
            if float(step.abs().max()) < 1e-12:
                break
        return values.detach()

    def spec(self, values: torch.Tensor) -> str:
        pieces, free = [], iter(range(len(self.free)))
        for kind in self.kinds:
            if kind in ("hflip", "vflip"):
                pieces.append(kind)
                continue
            value = float(values[next(free)])
            pieces.append(f"scale{math.exp(value):.4g}" if kind == "scale" else f"{kind}{value:.4g}")
        tx, ty = float(values[-2]), float(values[-1])
        if abs(tx) >= 0.005 or abs(ty) >= 0.005 or not pieces:
            pieces.append(f"translate{spec_number(round(tx, 2))},{spec_number(round(ty, 2))}")
        return "+".join(pieces)

    def params(self, values: torch.Tensor) -> dict:
        out, free = {}, iter(range(len(self.free)))
        for n, kind in enumerate(self.kinds):
            if kind in _UNITS:
                value = float(values[next(free)])
                out[f"{kind}{n}"] = math.exp(value) if kind == "scale" else value
        out["translate_x_px"], out["translate_y_px"] = float(values[-2]), float(values[-1])
        return out


def analytic_matrix(transform: Transform, height: int, width: int, stride: float = 1.0) -> np.ndarray:
    """g^-1's 3 x 3 normalized sampling matrix (b' = b(G .)) for an (height, width) map of the given stride,
    as the search builds it (see :func:`search_warp`)."""
    family = WarpFamily(transform, int(round(height * stride)), int(round(width * stride)))
    return family.normalized(family.init).numpy()
