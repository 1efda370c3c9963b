"""Classifiers with a spatial transformer placed in one of several ways.

Classifiers (``CLASSIFIERS``), for 1 x 28 x 28 inputs, no padding:

- ``classic``: conv 9 x 9 x 64 -> maxpool 2 -> ReLU (layer 1, 64 x 10 x 10),
  conv 7 x 7 x 64 -> maxpool 2 -> ReLU (layer 2, 64 x 2 x 2), linear to the
  classes. Localization: bilinear x0.5 (inputs wider than 20) -> conv 5 x 5 x 20
  -> maxpool 2 (maps of 8 or more after the conv) -> ReLU -> conv 5 x 5 x 20 -> ReLU
  -> FC 20 -> ReLU.
- ``small``: four blocks conv 3 x 3 -> ReLU -> BatchNorm with 16, 16 (stride 2),
  32, 32 (stride 2) channels (maps 26, 12, 10, 4), then FC 100 -> ReLU ->
  Dropout 0.15 -> linear to the classes. Localization: three 3 x 3 convs of 16
  with ReLU, strides 2 (1 for maps of 14 or less), 2, 1; on the last layer's
  4 x 4 map (k = 4) the first two are padded with stride 1.
- ``narrow``: ``small`` with 4, 4, 8, 8 channels (same maps, head and
  localization net): too small to learn every pose of every digit, so a
  classifier that gets digits in one canonical pose does better, which is
  what the STN is to learn.

Every localization net ends in ``Linear(n, P)`` whose weight and bias start
at zero, plus a fixed identity offset: the warp starts as the identity.

Variants (``variant_names``): ``none``; ``input`` (the localization net reads
and warps the input image); ``features@k`` (it reads the map after layer k and
warps *that map*, which goes on through layers k+1..); ``shared@k`` (it reads
the classifier's own layers 1..k applied to the input, warps *the input image*,
and the whole classifier runs on the warped image: layers 1..k get gradients
from both paths); ``deep@k`` (a separate, separately initialised copy of
layers 1..k plus the localization net reads and warps the input).
``iterative``: the input STN applied twice with one localization net (the
papers' extension): it reads the image, warps it, reads the warped image and
predicts a correction; the image is sampled once at the composition of the two.
``supervised`` is a control, not an STN variant: ``input``'s localization net
trained alone to predict the warp that undoes each sample's known transform
(see :func:`alignscope.stn.train.train_variant`): how far a network of that
size can undo the transforms of these images at all.

Warps (``WARPS``): ``affine`` (6 numbers), ``rotation`` (an angle),
``rotation_scale`` (an angle and a log zoom), as sampling matrices theta in
normalized coordinates (``align_corners=False``): output point q samples
the input at theta q; border padding outside the input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

WARPS = {"affine": 6, "rotation": 1, "rotation_scale": 2}
INPUT_SHAPE = (1, 28, 28)
STN_PADDING = "border"


def theta_from_params(params: torch.Tensor, warp: str) -> torch.Tensor:
    """(B, P) head outputs -> (B, 2, 3) sampling matrices; all-zero outputs give the identity.

    ``affine``: the 6 numbers are added to the identity; ``rotation``: an angle
    in radians; ``rotation_scale``: an angle and a log zoom.
    """
    if warp == "affine":
        identity = torch.tensor([1.0, 0, 0, 0, 1.0, 0], dtype=params.dtype, device=params.device)
        return (params + identity).reshape(-1, 2, 3)
    angle = params[:, 0]
    scale = torch.exp(params[:, 1]) if warp == "rotation_scale" else torch.ones_like(angle)
    c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
    zero = torch.zeros_like(angle)
    return torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)


def spatial_transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of x (B, C, H, W) at theta q (B, 2, 3) for each output point q, border padding.

    A non-finite theta raises FloatingPointError: grid_sample would return finite
    nonsense for NaN coordinates (border padding) and its CPU backward can crash
    the process, so a diverging localization net must stop here.
    """
    if not bool(torch.isfinite(theta).all()):
        raise FloatingPointError("the spatial transformer's sampling matrix became NaN or infinite")
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=STN_PADDING, align_corners=False)


def compose_sampling(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) sampling matrices: warping by ``first`` and then by ``then`` samples the input at first(then(q)).

    Sampling x at A1 q gives x1; sampling x1 at A2 q reads x at A1 A2 q (homogeneous 3 x 3 product).
    """
    return first[:, :, :2] @ then + torch.cat([torch.zeros_like(first[:, :, :2]), first[:, :, 2:]], dim=2)


class Localization(nn.Module):
    """A localization body (map -> flat features) and the zero-initialised last layer: map -> theta (B, 2, 3)."""

    def __init__(self, body: nn.Module, in_shape: tuple[int, int, int], warp: str) -> None:
        super().__init__()
        self.body, self.warp = body, warp
        with torch.no_grad():
            width = body(torch.zeros(2, *in_shape)).shape[1]
        self.last = nn.Linear(width, WARPS[warp])
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return theta_from_params(self.last(self.body(features)), self.warp)


class _Downsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


def _classic_layers(n_in: int) -> list[nn.Module]:
    return [nn.Sequential(nn.Conv2d(n_in, 64, 9), nn.MaxPool2d(2), nn.ReLU()),
            nn.Sequential(nn.Conv2d(64, 64, 7), nn.MaxPool2d(2), nn.ReLU())]


def _classic_localization(shape: tuple[int, int, int]) -> nn.Module:
    channels, side = shape[0], shape[-1]
    layers: list[nn.Module] = []
    if side > 20:
        layers.append(_Downsample())
        side //= 2
    layers.append(nn.Conv2d(channels, 20, 5))
    side -= 4
    if side >= 8:  # 28 -> 14 -> 10 -> 5 -> 1 on the input; 10 -> 6 -> 2 on layer 1's map
        layers.append(nn.MaxPool2d(2))
    layers += [nn.ReLU(), nn.Conv2d(20, 20, 5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(20), nn.ReLU()]
    return nn.Sequential(*layers)


def _conv_bn_layers(widths: tuple[int, int, int, int]) -> Callable[[int], list[nn.Module]]:
    """Four blocks conv 3 x 3 -> ReLU -> BatchNorm with ``widths`` channels and strides 1, 2, 1, 2."""
    def layers(n_in: int) -> list[nn.Module]:
        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride), nn.ReLU(), nn.BatchNorm2d(c_out))

        a, b, c, d = widths
        return [block(n_in, a, 1), block(a, b, 2), block(b, c, 1), block(c, d, 2)]

    return layers


_small_layers = _conv_bn_layers((16, 16, 32, 32))


def _small_localization(shape: tuple[int, int, int]) -> nn.Module:
    if shape[-1] <= 6:  # the last layer's 4 x 4 map: padded convs keep 4 x 4, the last one leaves 2 x 2
        return nn.Sequential(nn.Conv2d(shape[0], 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten())
    return nn.Sequential(nn.Conv2d(shape[0], 16, 3, stride=2 if shape[-1] > 14 else 1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten())


def _linear_head(n_features: int, n_classes: int) -> nn.Module:
    return nn.Linear(n_features, n_classes)


def _small_head(n_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 100), nn.ReLU(), nn.Dropout(0.15), nn.Linear(100, n_classes))


@dataclass(frozen=True)
class ClassifierSpec:
    """How to build one classifier: its layers, its head, its localization body and where an STN may go."""

    layers: Callable[[int], list[nn.Module]]
    head: Callable[[int, int], nn.Module]
    localization: Callable[[tuple[int, int, int]], nn.Module]
    placements: tuple[int, ...]  # k for features@k / shared@k / deep@k (maps large enough for the localization net)
    description: str


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "classic": ClassifierSpec(_classic_layers, _linear_head, _classic_localization, (1,),
                              "conv9x64-pool-relu, conv7x64-pool-relu, linear"),
    "small": ClassifierSpec(_small_layers, _small_head, _small_localization, (1, 2, 3, 4),
                            "4 x (conv3-relu-bn) 16,16/2,32,32/2, fc100-relu-dropout0.15, linear"),
    # small at a quarter of the width: too little capacity to learn every pose, so a canonical pose pays off
    "narrow": ClassifierSpec(_conv_bn_layers((4, 4, 8, 8)), _small_head, _small_localization, (1, 2, 3, 4),
                             "4 x (conv3-relu-bn) 4,4/2,8,8/2, fc100-relu-dropout0.15, linear"),
}


def variant_names(classifier: str) -> tuple[str, ...]:
    """Every variant the classifier supports, in the order of the comparison."""
    ks = CLASSIFIERS[classifier].placements
    return ("none", "input", "iterative", *(f"features@{k}" for k in ks), *(f"shared@{k}" for k in ks),
            *(f"deep@{k}" for k in ks),
            "supervised")


DEFAULT_VARIANTS = ("none", "input", "features@1", "features@2", "shared@2", "deep@2")
_PLACED = re.compile(r"(features|shared|deep)@(\d+)")  # a variant placed after layer k
_RANGE = re.compile(r"(features|shared|deep)@(\d+)\.\.(\d+)")


def depth_sweep_variants(classifier: str) -> tuple[str, ...]:
    """The depth sweep: no STN, the input STN (k = 0), then shared@k and deep@k for every k the classifier allows."""
    ks = CLASSIFIERS[classifier].placements
    return ("none", "input", *(f"shared@{k}" for k in ks), *(f"deep@{k}" for k in ks))


def expand_variants(spec: str, classifier: str) -> list[str]:
    """A ``--variants`` text as variant names, checked against the classifier.

    Comma-separated names; ``kind@a..b`` stands for kind@a, ..., kind@b
    (``deep@1..4``); ``default`` is :data:`DEFAULT_VARIANTS` (what the
    classifier allows; ``classic``: all of its variants), ``all`` every
    variant, ``depth-sweep`` :func:`depth_sweep_variants`. A name given twice
    is refused: it would train the same runs twice under one name.
    """
    if classifier not in CLASSIFIERS:
        raise UsageError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        match = _RANGE.fullmatch(part)
        if part == "all":
            names += variant_names(classifier)
        elif part == "default":
            names += list(variant_names(classifier)) if classifier == "classic" else [
                v for v in DEFAULT_VARIANTS if v in variant_names(classifier)]
        elif part == "depth-sweep":
            names += depth_sweep_variants(classifier)
        elif match:
            kind, first, last = match.group(1), int(match.group(2)), int(match.group(3))
            if first > last:
                raise UsageError(f"variant range {part!r} runs backwards; write {kind}@{last}..{first}")
            names += [f"{kind}@{k}" for k in range(first, last + 1)]
        else:
            names.append(part)
    if not names:
        raise UsageError("--variants names no variant; e.g. none,input,deep@1..4")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--variants names {', '.join(repeated)} more than once")
    for name in names:
        validate_variant(name, classifier)
    return names


def variant_depth(variant: str) -> int | None:
    """k of ``features@k`` / ``shared@k`` / ``deep@k``; 0 for ``input`` (it reads the image); None otherwise."""
    match = _PLACED.fullmatch(variant)
    return int(match.group(2)) if match else (0 if variant in ("input", "iterative") else None)


def validate_variant(variant: str, classifier: str) -> None:
    if classifier not in CLASSIFIERS:
        raise UsageError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    if variant not in ("none", "input", "iterative", "supervised") and not _PLACED.fullmatch(variant):
        raise UsageError(f"unknown variant {variant!r}; variants are none, input, iterative, supervised and "
                         "features@k, shared@k, deep@k (k a layer number; kind@a..b for a range)")
    if variant not in variant_names(classifier):
        raise UsageError(f"variant {variant!r} does not fit the {classifier} classifier; choose from "
                         f"{', '.join(variant_names(classifier))}")


class STNClassifier(nn.Module):
    """A classifier with the spatial transformer of ``variant`` (see the module docstring).

    ``predict_theta(x)`` is the sampling matrix the model applies for ``x``;
    ``stages(x)`` the maps after the STN (``stn``) and after each layer
    (``layer1``...), for analysis; ``forward(x)`` the logits.
    """

    def __init__(self, variant: str = "none", n_classes: int = 10, warp: str = "affine", classifier: str = "small") -> None:
        super().__init__()
        validate_variant(variant, classifier)
        if warp not in WARPS:
            raise UsageError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
        spec = CLASSIFIERS[classifier]
        self.variant, self.warp, self.classifier, self.n_classes = variant, warp, classifier, n_classes
        self.layers = nn.ModuleList(spec.layers(INPUT_SHAPE[0]))
        shapes = [INPUT_SHAPE]
        with torch.no_grad():
            h = torch.zeros(2, *INPUT_SHAPE)
            for layer in self.layers.eval():
                h = layer(h)
                shapes.append(tuple(h.shape[1:]))
        self.layers.train()
        self.head = spec.head(int(torch.tensor(shapes[-1]).prod()), n_classes)
        match = _PLACED.fullmatch(variant)
        self.kind, self.k = (match.group(1), int(match.group(2))) if match else (variant, 0)
        # the control: input's localization net, trained on the known transforms instead of through the classifier
        self.supervised = variant == "supervised"
        if self.supervised:
            self.kind = "input"
        self.loc_layers: nn.ModuleList | None = None  # deep@k: the separate copy of layers 1..k
        self.localization: Localization | None = None
        if variant != "none":
            self.localization = Localization(spec.localization(shapes[self.k]), shapes[self.k], warp)
        if self.kind == "deep":
            self.loc_layers = nn.ModuleList(spec.layers(INPUT_SHAPE[0])[: self.k])

    @property
    def warps_input(self) -> bool:
        return self.kind in ("input", "iterative", "shared", "deep")

    def _localization_input(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.loc_layers if self.kind == "deep" else self.layers[: self.k]
        for layer in layers:
            x = layer(x)
        return x

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, 2, 3) sampling matrix applied for input x (features@k: to layer k's map); None without an STN."""
        if self.localization is None:
            return None
        theta = self.localization(self._localization_input(x))
        if self.kind == "iterative":
            # the same localization net reads its own result and corrects it; the image is sampled once, at the
            # composed matrix (output point q -> theta q -> theta correction q), so the blur does not add up
            correction = self.localization(spatial_transform(x, theta))
            theta = compose_sampling(theta, correction)
        return theta

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps after the STN (``stn``, at its insertion point) and after each layer (``layer1``...)."""
        out: dict[str, torch.Tensor] = {}
        if self.warps_input:
            x = spatial_transform(x, self.predict_theta(x))
            out["stn"] = x
        h = x
        for index, layer in enumerate(self.layers, start=1):
            h = layer(h)
            if self.kind == "features" and index == self.k:
                h = spatial_transform(h, self.localization(h))
                out["stn"] = h
            out[f"layer{index}"] = h
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x)[f"layer{len(self.layers)}"].flatten(1))

    def localization_parameters(self) -> list[nn.Parameter]:
        """Parameters only the localization path uses (shared@k's shared layers are the classifier's)."""
        modules = [m for m in (self.localization, self.loc_layers) if m is not None]
        return [p for m in modules for p in m.parameters()]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def warped_inputs(model: "STNClassifier", images: torch.Tensor) -> torch.Tensor:
    """What the learned warp does to ``images``; for ``features@k`` the warp of layer k's map drawn on the image."""
    model.eval()
    theta = model.predict_theta(images)
    return images if theta is None else spatial_transform(images, theta)
