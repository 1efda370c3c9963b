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

from .fit.channels import ChannelStatistic
from .engine.context import RunContext
from .engine.options import refuse_both
from .errors import ImageError, UsageError
from .model.capture import FeatureCapture
from .inputs.images import ImageSource
from .floors import near_duplicates
from .inputs.options import PairOptions
from .inputs.pairs import chance_partners
from .model.options import ModelOptions
from .model.preserve import left_as_found
from .report.files import csv_text, publish_folder
from .geometry.transforms import Transform


@dataclass
class ChannelExplanation:
    """Result of :func:`explain`: ``table`` one row per channel, ``example`` maps of one image.

    The example is the image named by ``image``, or else the one whose map at
    the layer has the most structure (see :func:`_pick_example`), so the panels
    show features rather than speckle.
    """

    table: pd.DataFrame
    example: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self, top: int = 4):
        from .report.plots import channel_grid_figure

        return channel_grid_figure(self, top)

    def save(self, out: str | os.PathLike, force: bool = False, top: int = 4) -> Path:
        """Write ``channels.csv``, ``explain.json`` and ``channels.png`` into ``out`` atomically."""

        def write(folder: Path) -> None:
            from .report.plots import save_figures

            (folder / "channels.csv").write_text(csv_text(self.table), encoding="utf-8")
            (folder / "explain.json").write_text(json.dumps(self.meta, indent=2, default=str), encoding="utf-8")
            save_figures({"channels": self.figure(top)}, folder)

        return publish_folder(Path(out), write, force, kind="explain")


def explain(
    model: str | nn.Module | ModelOptions = "tf_efficientnet_lite0",
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
    image: str | None = None,
    *,
    pairs: PairOptions | None = None,
) -> ChannelExplanation:
    """Per-channel alignment of ``layer`` (default: the stage whose channels swap most) under one ``transform``.

    ``model`` and the model options (``weights``, ``pretrained``,
    ``input_size``, ``mean``, ``std``, ``device``; ``layer`` is its
    ``layers``) as for :func:`alignscope.analyze`, or one
    :class:`~alignscope.model.options.ModelOptions`.
    ``image`` picks the example drawn by :meth:`ChannelExplanation.figure` by
    file name, stem or path (default: the image with the most structure at the layer).
    ``pairs``: a :class:`~alignscope.inputs.options.PairOptions` instead of ``transform``, ``images``,
    ``batch_size``, ``mask``, ``seed`` and ``max_images``.
    """
    refuse_both("pairs", pairs, dict(transform=(transform, "rot90"), images=(images, None), batch_size=(batch_size, 16),
                                     mask=(mask, "auto"), seed=(seed, 0), max_images=(max_images, None)))
    pairs = pairs or PairOptions.build(transform, images, batch_size, mask, seed, max_images)
    if len(pairs.transforms) != 1:
        given = ", ".join(t.spec for t in pairs.transforms[:4])
        raise UsageError(f"explain takes one transform; {len(pairs.transforms)} were given ({given}"
                         f"{' ...' if len(pairs.transforms) > 4 else ''}); pick one value of the sweep")
    options = ModelOptions.build(model, weights=weights, pretrained=pretrained, input_size=input_size, mean=mean, std=std,
                                 layers=layer, device=device)
    with left_as_found(options.model):  # a caller's module comes back as it was
        return _explain(options, pairs, image)


class _LayerChannels:
    """Per-channel sums of one layer over the images (float64), its channel statistic and its example image."""

    def __init__(self, info) -> None:
        self.info = info
        channels = info.shape[0]
        self.sums = {k: torch.zeros(channels, dtype=torch.float64) for k in ("aligned", "unaligned", "chance")}
        self.stat = ChannelStatistic(channels)
        self.per_image: dict[str, list[torch.Tensor]] = {"aligned": [], "chance": [], "near": []}  # (B,) per image
        self.example: dict[str, torch.Tensor] = {}
        self.best_structure = -1.0

    def update(self, pair, near: torch.Tensor, names: list[str], image: str | None) -> None:
        self.per_image["near"].append(near.cpu())
        m = pair.mask.to(pair.reference.dtype)
        for name, other in (("aligned", pair.aligned), ("unaligned", pair.moved), ("chance", pair.other)):
            squared = ((pair.reference - other).square() * m).sum(dim=(2, 3), dtype=torch.float64).cpu()
            self.sums[name] += squared.sum(dim=0)
            if name in self.per_image:
                self.per_image[name].append(squared.sum(dim=1))
        self.stat.update(pair.reference, pair.aligned, pair.mask)
        pick, score = _pick_example(pair.reference, m, names, image)
        if pick is not None and score > self.best_structure:
            self.best_structure = score
            self.example = {"reference": pair.reference[pick].cpu().clone(), "aligned": pair.aligned[pick].cpu().clone(),
                            "mask": pair.mask.cpu().clone(), "image": names[pick]}

    def permutation(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_perm"):
            self._perm = self.stat.fit_permutation()
        return self._perm

    @property
    def moved(self) -> int:
        perm, _ = self.permutation()
        return int((perm != torch.arange(len(perm))).sum())


def _explain(options: ModelOptions, pairs: PairOptions, image: str | None) -> ChannelExplanation:
    ctx = RunContext.open(options, pairs, options.resolve_device())
    if options.layers is not None and len(ctx.layers) != 1:
        names = ", ".join(info.name for info in ctx.layers[:6])
        raise UsageError(f"explain takes one layer; {', '.join(options.layers or ())!r} selects {len(ctx.layers)} ({names}...); name one")
    g, dev = ctx.transforms[0], ctx.device
    stream = ctx.stream()
    if image is not None and stream.paths is not None and not any(_matches(p, image) for p in stream.paths):
        raise _unknown_image(image, [str(p) for p in stream.paths])  # before the work, not after it
    feeder = ctx.feeder()
    # without --layer, every default stage is measured in the same pass and the one whose channels swap most is shown
    layers = {info.name: _LayerChannels(info) for info in ctx.layers}
    with torch.inference_mode(), FeatureCapture(ctx.model, ctx.layers) as capture:
        for batch in stream:
            x = batch.pixels.to(dev)
            _, near = near_duplicates(x, chance_partners(x, batch.partner))  # left out of the ratio, as in analyze
            for pair in feeder.pairs(x, capture, batch.partner):  # chance partners as analyze forms them
                layers[pair.layer.name].update(pair, near, batch.names, image)
    if len(stream.used) < 2:
        raise ImageError("fewer than 2 readable images; pass --images with readable files")
    if len(layers) == 1:
        chosen, why = next(iter(layers.values())), "asked for (--layer)"
    else:
        share = {name: layer.moved / layer.info.shape[0] for name, layer in layers.items()}
        chosen = layers[max(share, key=lambda name: (share[name], name == ctx.layers[-1].name))]
        listed = ", ".join(f"{name} {layer.moved}/{layer.info.shape[0]}" for name, layer in layers.items())
        why = (f"the default stage whose best channel permutation moves the largest share of its channels "
               f"({listed}); pass --layer to pick another")
    if not chosen.example:
        raise _unknown_image(image, list(stream.used))
    info, sums, stat, example = chosen.info, chosen.sums, chosen.stat, chosen.example
    channels = info.shape[0]
    perm, corr = chosen.permutation()
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
    per_image = chosen.per_image
    meta = {
        "model": ctx.cfg.model_name, "model_options": options.as_json(), "weights": ctx.cfg.weights,
        "pretrained": ctx.cfg.pretrained,
        "layer": info.name, "layer_reason": why, "stride": info.stride, "shape": list(info.shape), "transform": g.spec,
        "mask": pairs.mask, "images_used": list(stream.used), "example_image": example.get("image"),
        "example_reason": "chosen by name" if image else f"most structure at {info.name}",
        # the mean over images of each image's ratio, exactly as alignment.csv's aligned_error ...
        "layer_aligned_error": _mean_ratio(torch.cat(per_image["aligned"]), torch.cat(per_image["chance"]),
                                           torch.cat(per_image["near"])),
        # ... and pooled over images (ratio of sums), the only form the fitted permutation has
        "layer_aligned_error_pooled": float(sums["aligned"].sum().sqrt() / sums["chance"].sum().sqrt()),
        "layer_matched_error": float(matched.clamp(min=0).sum().sqrt() / sums["chance"].sum().sqrt()),
        "channels_moved_by_permutation": chosen.moved,
    }
    return ChannelExplanation(table=table, example=example, meta=meta)


def _mean_ratio(aligned_sq: torch.Tensor, chance_sq: torch.Tensor, near: torch.Tensor) -> float:
    """Mean over images of sqrt(aligned) / sqrt(chance), leaving out images whose chance distance is 0 or whose
    partner is a near-duplicate (see :mod:`alignscope.floors`)."""
    keep = (chance_sq > 0) & ~near
    if not keep.any():
        return float("nan")
    return float((aligned_sq[keep].sqrt() / chance_sq[keep].sqrt()).mean())


def _unknown_image(image: str | None, names: list[str]) -> UsageError:
    shown = ", ".join(Path(str(n)).name for n in names[:8])
    return UsageError(f"image {image!r} is not among the {len(names)} images used ({shown}{', ...' if len(names) > 8 else ''}); "
                      "pass one of their names or add it with --images")


def _matches(name: str, wanted: str) -> bool:
    path = Path(str(name))
    return wanted in (str(name), path.name, path.stem)


def _pick_example(reference: torch.Tensor, mask: torch.Tensor, names: list[str], wanted: str | None) -> tuple[int | None, float]:
    """The batch index of the example candidate and its score (higher wins across batches).

    With ``wanted``: the image of that name, score +inf. Otherwise the image
    whose map has the most spatially coherent variation: the variance over the
    valid cells of the map smoothed by a 3 x 3 mean (cell-to-cell speckle, as
    in a star field, averages out), summed over channels, in float64.
    """
    if wanted is not None:
        hits = [i for i, name in enumerate(names) if _matches(name, wanted)]
        return (hits[0], float("inf")) if hits else (None, -1.0)
    weight = mask.to(torch.float64).expand_as(reference[0])
    count = weight.sum(dim=(1, 2)).clamp(min=1)
    smooth = torch.nn.functional.avg_pool2d(reference.to(torch.float64) * weight, 3, stride=1, padding=1)
    mean = (smooth * weight).sum(dim=(2, 3)) / count
    variance = (((smooth - mean[..., None, None]) ** 2) * weight).sum(dim=(2, 3)) / count
    score = variance.sum(dim=1)
    best = int(score.argmax())
    return best, float(score[best])
