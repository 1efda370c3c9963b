"""How much rotation an STN undoes: the angle metric.

For a test image rotated by a known angle theta (degrees, counter-clockwise on
screen), the STN predicts a sampling matrix A (output point -> input point,
normalized coordinates). The warp it applies to the image is A^-1; its angle
phi is read from the 2 x 2 part M of A^-1 as

    phi = atan2(M[0,1] - M[1,0], M[0,0] + M[1,1])    (degrees),

the angle of the rotation closest to M (exact for a rotation times a zoom), in
the convention of :func:`alignscope.stn.data.task_matrices`. Full
compensation is phi = -theta + c, with c a canonical pose that may differ per
class, so:

- ``angle_std_deg``: per class, the circular standard deviation of
  theta + phi about its class mean, averaged over classes; 0 when every digit
  is brought to one pose per class, 180 / sqrt(12) = 51.96 for no
  compensation (phi = 0) with theta uniform in [-90, 90];
- ``deming_slope``: the slope of a Deming (orthogonal, equal error
  variances) regression of phi on theta after removing each class's mean;
  -1 for full compensation, 0 for none.
"""
from __future__ import annotations

import math

import torch

from .data import invert_affine

NO_COMPENSATION_STD = 180.0 / math.sqrt(12.0)


def warp_angle_deg(sampling: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) sampling matrices (output -> input) -> (B,) float64 angle of the warp they apply, in degrees."""
    if sampling.ndim != 3 or sampling.shape[1:] != (2, 3):
        raise ValueError(f"sampling matrices must be (B, 2, 3); got {tuple(sampling.shape)}")
    m = invert_affine(sampling.to(torch.float64))
    return torch.rad2deg(torch.atan2(m[:, 0, 1] - m[:, 1, 0], m[:, 0, 0] + m[:, 1, 1]))


def _wrap(deg: torch.Tensor) -> torch.Tensor:
    """Degrees to [-180, 180)."""
    return torch.remainder(deg + 180.0, 360.0) - 180.0


def _circular_mean(deg: torch.Tensor) -> torch.Tensor:
    rad = torch.deg2rad(deg)
    return torch.rad2deg(torch.atan2(torch.sin(rad).mean(), torch.cos(rad).mean()))


def angle_metrics(true_deg: torch.Tensor, warp_deg: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``angle_std_deg`` and ``deming_slope`` (see the module docstring) from (N,) angles and labels.

    Classes with fewer than 2 samples are left out (their spread is undefined);
    ``n_classes`` says how many counted.
    """
    true_deg, warp_deg = true_deg.to(torch.float64), warp_deg.to(torch.float64)
    if not (true_deg.shape == warp_deg.shape == labels.shape) or true_deg.ndim != 1:
        raise ValueError(f"angles and labels must be (N,) each; got {tuple(true_deg.shape)}, "
                         f"{tuple(warp_deg.shape)}, {tuple(labels.shape)}")
    stds, xs, ys = [], [], []
    for label in labels.unique():
        members = labels == label
        if int(members.sum()) < 2:
            continue
        total = true_deg[members] + warp_deg[members]
        residual = _wrap(total - _circular_mean(total))  # theta + phi about the class pose, unwrapped
        stds.append(float(residual.square().mean().sqrt()))
        # phi with the wrap undone around -theta + class pose, then centred per class for the regression
        phi = residual - true_deg[members]
        xs.append(true_deg[members] - true_deg[members].mean())
        ys.append(phi - phi.mean())
    if not stds:
        return {"angle_std_deg": math.nan, "deming_slope": math.nan, "n_classes": 0}
    return {"angle_std_deg": sum(stds) / len(stds), "deming_slope": deming_slope(torch.cat(xs), torch.cat(ys)),
            "n_classes": len(stds)}


def deming_slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Slope of the Deming regression of y on x with equal error variances (orthogonal regression)."""
    x, y = x.to(torch.float64) - x.mean(), y.to(torch.float64) - y.mean()
    sxx, syy, sxy = float((x * x).mean()), float((y * y).mean()), float((x * y).mean())
    if abs(sxy) < 1e-12 * max(sxx, syy, 1e-300):
        return 0.0 if sxx >= syy else math.inf
    return (syy - sxx + math.sqrt((syy - sxx) ** 2 + 4 * sxy * sxy)) / (2 * sxy)
