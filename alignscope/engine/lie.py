"""The Lie-derivative passes of :func:`~alignscope.engine.analysis.analyze` (``lie=True``).

Per batch and generator, one forward-mode pass (``torch.autograd.forward_ad``) of the batch and its
carried chance partner, the tangent being −v·∇x: every selected layer's map and the model's output
come back with their directional derivatives J[−v·∇x] (:mod:`alignscope.measure.lie`). The passes
run in float32 outside inference mode (forward-mode AD needs ordinary tensors) and without
gradients, always in float32 and without autocast (``--amp`` does not apply to them); nothing of them is
kept but the statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

from ..errors import LayerError, first_line

from ..geometry.generators import Generator, cell_displacement, directional_difference
from ..inputs.pairs import MODEL_OUTPUT, PairFeeder, chance_partners, keep_disk
from ..measure.lie import LieMeter, layer_lie_values, output_lie_values
from ..model.capture import FeatureCapture


class LieRunner:
    """Feeds one batch through the model once per generator in forward mode and updates ``meter``."""

    def __init__(self, feeder: PairFeeder, capture: FeatureCapture, meter: LieMeter) -> None:
        self.feeder, self.capture, self.meter = feeder, capture, meter

    def update(self, x: torch.Tensor, partner: torch.Tensor | None) -> None:
        """Add the batch ``x`` (B, 3, H, W, normalized) with its carried chance ``partner`` (1, 3, H, W) or ``None``."""
        feeder, n = self.feeder, x.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            batch = x.clone() if partner is None else torch.cat([x, partner.to(x.device, x.dtype)])
            for generator in self.meter.generators:
                disk = generator.disk and feeder.mask_mode == "auto" or feeder.mask_mode == "disk"
                images = keep_disk(batch, feeder.image_disk, feeder.fill) if disk else batch
                with feeder.timer("lie"):
                    derivatives = lie_derivatives(self.capture, images, generator, feeder.image_size, feeder.fill)
                    for layer in self.meter.layers:
                        maps, lie = derivatives[layer.name]
                        partners = chance_partners(maps[:n], maps[n:n + 1] if partner is not None else None)
                        self.meter.update(layer.name, generator, layer_lie_values(
                            maps[:n], lie[:n], partners, generator, disk))
                    if self.meter.output and MODEL_OUTPUT in derivatives:
                        scores, tangent = derivatives[MODEL_OUTPUT]
                        self.meter.update("<output>", generator, output_lie_values(scores[:n], tangent[:n]))


def lie_derivatives(capture: FeatureCapture, images: torch.Tensor, generator: Generator, image_hw: tuple[int, int],
                    fill: float | list[float] = 0.0, difference: str = "central") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (F(x), L F(x))} for every layer ``capture`` reads, each (B, C, h, w) float32, and, when the capture
    returns the model's output, {MODEL_OUTPUT: (f(x), J_f[−v·∇x])} (B, K): one forward-mode pass.

    ``images`` (B, 3, H, W) normalized, extended by ``fill`` (black) beyond their edges; call outside
    inference mode. ``difference``: see :func:`~alignscope.geometry.generators.directional_difference`."""
    dj, di = cell_displacement(generator, *image_hw, image_hw, images.device)
    tangent = -directional_difference(images, dj, di, fill, difference).to(images.dtype)
    try:
        with forward_ad.dual_level(), _unfused_attention(capture.model):
            captured = capture(forward_ad.make_dual(images, tangent))
            unpacked = {name: forward_ad.unpack_dual(value) for name, value in captured.items()}
    except NotImplementedError as exc:
        raise LayerError(f"the model uses an operation PyTorch's forward mode cannot differentiate, so --lie cannot "
                         f"measure it ({first_line(exc)[:160]})") from None
    out = {}
    for name, (primal, derivative) in unpacked.items():
        primal, derivative = primal.float(), _tangent_or_zero(derivative, primal).float()
        if name != MODEL_OUTPUT:
            height, width = primal.shape[-2:]
            map_dj, map_di = cell_displacement(generator, height, width, image_hw, primal.device)
            derivative = derivative + directional_difference(primal, map_dj, map_di, 0.0, difference).float()
        out[name] = (primal, derivative)
    return out


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention modules with their fused kernel off (``fused_attn``): the fused CPU kernel has no
    forward-mode derivative, the plain one computes the same attention."""
    switched = [module for module in model.modules() if getattr(module, "fused_attn", False) is True]
    for module in switched:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True


def _tangent_or_zero(derivative: torch.Tensor | None, primal: torch.Tensor) -> torch.Tensor:
    """A layer whose output does not depend on the input has no tangent: its derivative is 0."""
    return torch.zeros_like(primal) if derivative is None else derivative
