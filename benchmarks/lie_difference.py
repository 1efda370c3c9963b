"""How much the discrete derivative moves the end-to-end Lie derivative: central against one-sided.

alignscope differentiates the image with a central difference; differentiating bilinear resampling at
its sample points (the way a tool that takes d/dt of ``grid_sample`` at t = 0 does) gives the
difference to the next pixel instead. This prints, for the default model and the bundled photos, the
output's mean |dp_k/dt| per generator both ways and their ratio (docs/measures.md quotes it).

Run:  python benchmarks/lie_difference.py
"""
from __future__ import annotations

import torch

from alignscope.engine.lie import lie_derivatives
from alignscope.geometry.generators import GENERATORS
from alignscope.inputs.images import image_stream
from alignscope.measure.lie import output_lie_values
from alignscope.model.build import load_model
from alignscope.model.capture import MODEL_OUTPUT, FeatureCapture


def main() -> None:
    model, cfg = load_model("tf_efficientnet_lite0")
    model.eval()
    x = torch.cat([batch.pixels for batch in image_stream(None, cfg, batch_size=8)])
    black = [-m / s for m, s in zip(cfg.mean, cfg.std)]
    size = tuple(cfg.input_size[1:])
    print(f"tf_efficientnet_lite0, {len(x)} bundled photos (whole images, no disk): output mean |dp/dt| per unit t")
    print(f"{'generator':<12} {'central':>9} {'one-sided':>10} {'ratio':>6}")
    with FeatureCapture(model, [], output_classes=1000) as capture, torch.no_grad():
        for name, generator in GENERATORS.items():
            values = {}
            for difference in ("central", "forward"):
                scores, tangent = lie_derivatives(capture, x, generator, size, black, difference)[MODEL_OUTPUT]
                values[difference] = float(output_lie_values(scores, tangent)["lie_output"].mean())
            print(f"{name:<12} {values['central']:>9.4f} {values['forward']:>10.4f} {values['forward'] / values['central']:>6.2f}")


if __name__ == "__main__":
    main()
