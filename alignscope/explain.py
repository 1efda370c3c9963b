"""Which channels carry the misalignment of one layer under one transform.

Per channel c, over the valid cells of all images (float64 sums):

- ``aligned_error``   = sqrt(sum ||a_c - b'_c||^2) / sqrt(sum ||a_c - o_c||^2),
  o the chance partner, so 1 is chance level for that channel alone;
- ``unaligned_error`` the same with b = F(g x) before the inverse warp;
- ``share`` the channel's part of the layer's squared aligned distance;
- ``match`` the b' channel the best permutation assigns to c (Hungarian on
  the summed squared distance between channels, as
  ``channel_map="permutation"`` in :func:`analyze`), the matched pair's
  correlation (descriptive), and ``matched_error`` (aligned_error with
  b'_match instead of b'_c).

Unlike :func:`alignscope.analyze` with ``channel_map``, the permutation here
is fitted and shown on the same images: it describes, it does not test.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .channels import ChannelStatistic
from .engine import _setup, check_common_options, resolve_device
from .errors import ImageError, UsageError
from .hooks import FeatureCapture
from .images import ImageSource, image_stream
from .pairs import PairFeeder
from .report import publish_folder
from .transforms import Transform, as_transforms


@dataclass
class ChannelExplanation:
    """Result of :func:`explain`: ``table`` one row per channel, ``example`` maps of the first image."""

    table: pd.DataFrame
    example: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self, top: int = 4):
        from .plots import channel_grid_figure

        return channel_grid_figure(self, top)

    def save(self, out: str | os.PathLike, force: bool = False, top: int = 4) -> Path:
        """Write ``channels.csv``, ``explain.json`` and ``channels.png`` into ``out`` atomically."""

        def write(folder: Path) -> None:
            from .plots import save_figures

            self.table.to_csv(folder / "channels.csv", index=False)
            (folder / "explain.json").write_text(json.dumps(self.meta, indent=2, default=str), encoding="utf-8")
            save_figures({"channels": self.figure(top)}, folder)

        return publish_folder(Path(out), write, force)


def explain(
    model: str | nn.Module = "tf_efficientnet_lite0",
    layer: str | None = None,
    transform: str | Transform = "rot90",
    images: ImageSource = None,
    batch_size: int = 16,
    mask: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_images: int | None = None,
    weights: str | None = "auto",
    pretrained: bool = True,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ChannelExplanation:
    """Per-channel alignment of ``layer`` (default: the deepest stage) under one ``transform``."""
    check_common_options(mask, batch_size)
    transforms = as_transforms(transform)
    if len(transforms) != 1:
        raise UsageError(f"explain takes one transform, {transform!r} gives {len(transforms)}; pick one value of the sweep")
    dev = resolve_device(device)
    setup = _setup(model, weights, pretrained, input_size, mean, std, layer, transforms, dev)
    if len(setup.layers) != 1:
        names = ", ".join(info.name for info in setup.layers[:6])
        raise UsageError(f"explain takes one layer; {layer!r} selects {len(setup.layers)} ({names}...); name one")
    info, g = setup.layers[0], setup.transforms[0]
    stream = image_stream(images, setup.cfg, batch_size, max_images, seed)
    if len(stream) < 2:
        raise ImageError(f"need at least 2 images (chance compares different images), got {len(stream)}")
    fill = [-m / s for m, s in zip(setup.cfg.mean, setup.cfg.std)]
    feeder = PairFeeder(setup.layers, setup.transforms, mask, fill, tuple(setup.cfg.input_size[1:]), dev)
    channels = info.shape[0]
    sums = {k: torch.zeros(channels, dtype=torch.float64) for k in ("aligned", "unaligned", "chance", "sq_b")}
    stat = ChannelStatistic(channels)
    example: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), FeatureCapture(setup.model, setup.layers) as capture:
        for batch in stream:
            for pair in feeder.pairs(batch.pixels.to(dev), capture):
                m = pair.mask.to(pair.reference.dtype)
                for name, other in (("aligned", pair.aligned), ("unaligned", pair.moved), ("chance", pair.other)):
                    sums[name] += ((pair.reference - other).square() * m).sum(dim=(0, 2, 3), dtype=torch.float64).cpu()
                stat.update(pair.reference, pair.aligned, pair.mask)
                if not example:
                    example = {"reference": pair.reference[0].cpu().clone(), "aligned": pair.aligned[0].cpu().clone(),
                               "mask": pair.mask.cpu().clone(), "image": batch.names[0]}
    if len(stream.used) < 2:
        raise ImageError("fewer than 2 readable images; pass --images with readable files")
    perm, corr = stat.fit_permutation()
    # sum ||a_c - b'_j||^2 from the statistics: sum a_c^2 - 2 sum a_c b'_j + sum b'_j^2
    matched = stat.sq_a - 2 * stat.cross[torch.arange(channels), perm] + torch.diagonal(stat.gram)[perm]
    chance = sums["chance"].sqrt()
    safe = torch.where(chance > 0, chance, torch.full_like(chance, float("nan")))
    total = float(sums["aligned"].sum())
    table = pd.DataFrame({
        "channel": range(channels),
        "aligned_error": (sums["aligned"].sqrt() / safe).numpy(),
        "unaligned_error": (sums["unaligned"].sqrt() / safe).numpy(),
        "share": (sums["aligned"] / total if total > 0 else sums["aligned"] * float("nan")).numpy(),
        "match": perm.numpy(),
        "match_correlation": corr.numpy(),
        "matched_error": (matched.clamp(min=0).sqrt() / safe).numpy(),
    })
    meta = {
        "model": setup.cfg.model_name, "weights": setup.cfg.weights, "pretrained": setup.cfg.pretrained,
        "layer": info.name, "stride": info.stride, "shape": list(info.shape), "transform": g.spec, "mask": mask,
        "images_used": list(stream.used), "example_image": example.get("image"),
        "layer_aligned_error": float(sums["aligned"].sum().sqrt() / sums["chance"].sum().sqrt()),
        "layer_matched_error": float(matched.clamp(min=0).sum().sqrt() / sums["chance"].sum().sqrt()),
        "channels_moved_by_permutation": int((perm != torch.arange(channels)).sum()),
    }
    return ChannelExplanation(table=table, example=example, meta=meta)
