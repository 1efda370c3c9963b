"""Reading a module's output as a (B, C, H, W) feature map: the layout resolver.

Everything downstream of :mod:`alignscope.model.capture` works on (B, C, H, W) maps
whose cell (i, j) covers input pixels around ``stride * (i, j)``. Models do
not all return that: Swin and ConvNeXt's block internals are channels-last
(B, H, W, C), ViT-like models return token sequences (B, N, C) with class or
register tokens in front of the patch grid, window attention returns
(B * windows, ...) and attention returns (B, heads, tokens, head_dim).

:func:`resolve_layout` decides, once per module at probe time and from
evidence, how its output becomes a map, or why it cannot:

1. the leading dimension must be the input batch (else "window-partitioned");
2. a reading is *consistent* when its two spatial sizes have the input's
   aspect ratio (within a cell or so, to allow for valid convolutions and
   ceil-mode pooling); token sequences must factor, after the prefix tokens,
   as such a grid;
3. among consistent readings, the probe at a second input size (the axes that
   change are spatial, the one that does not is channels) decides, then the
   module's own type (a ``Linear`` or plain ``LayerNorm`` acts on the last
   axis, a ``Conv2d`` writes its channels on axis 1), then the channel count
   timm's ``feature_info`` states for a stage, then timm's ``output_fmt`` for
   its stages; a tie left after that is read as NCHW and says "assumed".

A :class:`Layout` turns a captured tensor into (B, C, H, W) with
:meth:`Layout.to_nchw`; the converters live in :data:`CONVERTERS`, one per
``kind``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

# --- layouts and their converters ---------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one captured tensor becomes a (B, C, H, W) map.

    ``kind``: ``"NCHW"`` (as is), ``"NHWC"`` (channels last), ``"NLC"``
    (tokens (B, N, C)) or ``"NCL"`` (tokens (B, C, N)). For token kinds,
    ``grid`` is the (H, W) patch grid and ``prefix`` the number of leading
    tokens (class, distillation, register tokens) left out of the map.
    ``evidence`` says what decided it.
    """

    kind: str = "NCHW"
    grid: tuple[int, int] | None = None
    prefix: int = 0
    evidence: str = ""

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) view (or copy, for token grids) of ``x``."""
        return CONVERTERS[self.kind](x, self)

    def from_nchw(self, nchw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_nchw`: ``nchw`` (B, C, H, W) written in the layout of ``like``, the captured
        tensor it replaces (its prefix tokens kept as they are; its dtype, device and shape)."""
        out = WRITERS[self.kind](nchw.to(like.dtype), like, self)
        if out.shape != like.shape:
            raise ValueError(f"a {tuple(nchw.shape)} map written as {self} gives {tuple(out.shape)}, not {tuple(like.shape)}")
        return out

    def at_input(self, x: torch.Tensor, input_hw: tuple[int, int]) -> "Layout":
        """This layout for ``x`` captured from an input of ``input_hw`` (H, W) other than the probed one.

        Channel order does not depend on the input size; a token grid does,
        so it is factored anew from ``x``'s token count (prefix tokens kept).
        Raises ``ValueError`` when the tokens form no grid at that size.
        """
        if self.grid is None:
            return self
        count = int(x.shape[1 if self.kind == "NLC" else 2]) - self.prefix
        grid = token_grid(count, input_hw)
        if grid is None:
            raise ValueError(f"{count} tokens form no grid at a {input_hw[0]} x {input_hw[1]} input")
        return Layout(self.kind, grid, self.prefix, self.evidence)

    def describe(self) -> str:
        """Short label: ``NCHW``, ``NHWC``, ``tokens 14x14`` or ``tokens 1+14x14`` (prefix left out)."""
        if self.grid is None:
            return self.kind
        grid = f"{self.grid[0]}x{self.grid[1]}"
        order = "" if self.kind == "NLC" else " (B,C,N)"
        return f"tokens {self.prefix}+{grid}{order}" if self.prefix else f"tokens {grid}{order}"

    def __str__(self) -> str:
        return self.describe()


def _nchw(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    return x


def _nhwc(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _tokens_last(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    height, width = layout.grid  # type: ignore[misc]
    grid = x[:, layout.prefix:, :]
    return grid.reshape(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)


def _tokens_first(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    height, width = layout.grid  # type: ignore[misc]
    return x[:, :, layout.prefix:].reshape(x.shape[0], x.shape[1], height, width)


CONVERTERS: dict[str, Callable[[torch.Tensor, Layout], torch.Tensor]] = {
    "NCHW": _nchw,
    "NHWC": _nhwc,
    "NLC": _tokens_last,
    "NCL": _tokens_first,
}

#: The inverses, (map, captured tensor, layout) -> a tensor shaped like the captured one.
WRITERS: dict[str, Callable[[torch.Tensor, torch.Tensor, Layout], torch.Tensor]] = {
    "NCHW": lambda m, like, layout: m.clone(),  # a copy: a later in-place op of the model must not reach the caller's map
    "NHWC": lambda m, like, layout: m.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format),
    "NLC": lambda m, like, layout: torch.cat([like[:, :layout.prefix, :], m.flatten(2).transpose(1, 2)], dim=1),
    "NCL": lambda m, like, layout: torch.cat([like[:, :, :layout.prefix], m.flatten(2)], dim=2),
}

NCHW = Layout("NCHW")

# --- what the model says about itself -------------------------------------------


@dataclass
class ModelHints:
    """What the resolver knows about the model: input size, probe batch, token metadata.

    ``prefix_tokens``: candidate numbers of leading non-grid tokens, the
    model's ``num_prefix_tokens`` first, then 0. ``patch_grid``: the model's
    patch grid (``patch_embed.grid_size``) if it has one. ``stage_formats``:
    module name -> ``"NCHW"``/``"NHWC"`` from timm's ``output_fmt`` for its
    ``feature_info`` stages. ``stage_channels``: module name -> the channel
    count its ``feature_info`` entry states (``num_chs``).
    """

    input_hw: tuple[int, int]
    batch: int
    prefix_tokens: tuple[int, ...] = (0,)
    patch_grid: tuple[int, int] | None = None
    stage_formats: dict[str, str] = field(default_factory=dict)
    stage_channels: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, input_hw: Sequence[int], batch: int, stages: Sequence[str] = (),
                   channels: dict[str, int] | None = None) -> "ModelHints":
        prefix = getattr(model, "num_prefix_tokens", 0)
        prefix = int(prefix) if isinstance(prefix, int) and prefix > 0 else 0
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        patch_grid = (int(grid[0]), int(grid[1])) if isinstance(grid, (tuple, list)) and len(grid) == 2 else None
        fmt = getattr(model, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)  # timm's Format enum or a plain string
        formats = {name: str(fmt) for name in stages} if str(fmt) in ("NCHW", "NHWC") else {}
        counts = {name: int(count) for name, count in (channels or {}).items() if isinstance(count, int) and count > 0}
        return cls((int(input_hw[0]), int(input_hw[1])), batch, tuple(dict.fromkeys((prefix, 0))), patch_grid, formats, counts)


# --- module-type evidence: which axis a module writes its channels on -----------


def _linear_axis(module: nn.Module, shape: Sequence[int]) -> str | None:
    return "NHWC" if shape[-1] == module.out_features else None


def _layer_norm_axis(module: nn.Module, shape: Sequence[int]) -> str | None:
    # timm's LayerNorm2d subclasses nn.LayerNorm but normalizes axis 1: only the plain class counts
    if type(module) is not nn.LayerNorm:
        return None
    normalized = tuple(module.normalized_shape)
    return "NHWC" if len(normalized) == 1 and shape[-1] == normalized[0] else None


def _conv_axis(module: nn.Module, shape: Sequence[int]) -> str | None:
    return "NCHW" if shape[1] == module.out_channels else None


def _batch_norm_axis(module: nn.Module, shape: Sequence[int]) -> str | None:
    return "NCHW" if shape[1] == module.num_features else None


MODULE_AXIS_EVIDENCE: dict[type, Callable[[nn.Module, Sequence[int]], str | None]] = {
    nn.Linear: _linear_axis,
    nn.LayerNorm: _layer_norm_axis,
    nn.Conv2d: _conv_axis,
    nn.ConvTranspose2d: _conv_axis,
    nn.BatchNorm2d: _batch_norm_axis,
}


def module_axis_evidence(module: nn.Module, shape: Sequence[int]) -> str | None:
    """``"NCHW"``/``"NHWC"`` if the module's type says where its 4-D output keeps channels."""
    for kind in type(module).__mro__:
        if kind in MODULE_AXIS_EVIDENCE:
            return MODULE_AXIS_EVIDENCE[kind](module, shape)
    return None


# --- the resolver --------------------------------------------------------------


def grid_fits(height: int, width: int, input_hw: tuple[int, int]) -> bool:
    """Whether an (height, width) grid has the input's aspect ratio, within a cell.

    Valid convolutions and ceil-mode pooling make sizes differ from
    input / stride by a cell or two, so the test allows one cell plus 5%.
    """
    if height < 2 or width < 2:
        return False
    in_h, in_w = input_hw
    expected = width * in_h / in_w
    return abs(height - expected) <= 1.0 + 0.05 * height


def token_grid(count: int, input_hw: tuple[int, int], patch_grid: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The (H, W) grid that ``count`` tokens form at the input's aspect ratio, or None.

    The model's own patch grid wins when it has exactly ``count`` cells;
    otherwise the factorization closest to the input's aspect ratio, if
    :func:`grid_fits` accepts it.
    """
    if patch_grid is not None and patch_grid[0] * patch_grid[1] == count:
        return patch_grid
    in_h, in_w = input_hw
    best = None
    for height in range(2, count // 2 + 1):
        if count % height:
            continue
        width = count // height
        miss = abs(height * in_w - width * in_h)
        if grid_fits(height, width, input_hw) and (best is None or miss < best[0]):
            best = (miss, (height, width))
    return best[1] if best else None


@dataclass
class Resolution:
    """The resolver's answer for one tensor: a layout and the (C, H, W) it gives, or a reason it is not a map."""

    layout: Layout | None
    shape: tuple[int, ...] | None
    reason: str = ""

    @property
    def spatial(self) -> bool:
        return self.layout is not None


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape)


def _changing_axes(shape: Sequence[int], resized: Sequence[int] | None) -> tuple[int, ...] | None:
    if resized is None or len(resized) != len(shape):
        return None
    return tuple(axis for axis in range(1, len(shape)) if shape[axis] != resized[axis])


def _is_token_count(count: int, hints: ModelHints) -> bool:
    return hints.patch_grid is not None and any(
        count - prefix == hints.patch_grid[0] * hints.patch_grid[1] for prefix in hints.prefix_tokens)


def _resolve_4d(shape: Sequence[int], hints: ModelHints, resized: Sequence[int] | None,
                module: nn.Module | None, stage_format: str | None, stage_channels: int | None = None) -> Resolution:
    if _is_token_count(shape[2], hints):
        # (B, heads, tokens, head_dim) or (B, heads, tokens, tokens): checked first, since a head_dim close to
        # the token count would pass the aspect test
        return Resolution(None, tuple(shape[1:]), f"attention tensor (B, heads, tokens, ...) {_shape_text(shape)}, not a map")
    readings = {"NCHW": (shape[1], shape[2], shape[3]), "NHWC": (shape[3], shape[1], shape[2])}
    consistent = [kind for kind, (_, h, w) in readings.items() if grid_fits(h, w, hints.input_hw)]
    if not consistent:
        if min(shape[2], shape[3]) < 2 and min(shape[1], shape[2]) < 2:
            return Resolution(None, tuple(shape[1:]), f"output {_shape_text(shape)} has no spatial extent, not a map")
        return Resolution(None, tuple(shape[1:]), f"output {_shape_text(shape)} has no pair of axes with the input's aspect ratio, not a map")
    evidence = "only reading with the input's aspect ratio"
    changing = _changing_axes(shape, resized)
    if len(consistent) > 1 and changing:
        by_probe = [kind for kind in consistent if {"NCHW": (2, 3), "NHWC": (1, 2)}[kind] == changing]
        if len(by_probe) == 1:
            consistent, evidence = by_probe, "axes that change with the input size"
    if len(consistent) > 1 and module is not None:
        said = module_axis_evidence(module, shape)
        if said in consistent:
            consistent, evidence = [said], f"{type(module).__name__} acts on that axis"
    if len(consistent) > 1 and stage_channels is not None:
        by_channels = [kind for kind in consistent if readings[kind][0] == stage_channels]
        if len(by_channels) == 1:
            consistent, evidence = by_channels, f"timm feature_info num_chs {stage_channels}"
    if len(consistent) > 1 and stage_format in consistent:
        consistent, evidence = [stage_format], f"timm output_fmt {stage_format}"
    if len(consistent) > 1:
        consistent, evidence = ["NCHW"], "ambiguous shape, NCHW assumed"
    kind = consistent[0]
    return Resolution(Layout(kind, evidence=evidence), readings[kind])


def _resolve_3d(shape: Sequence[int], hints: ModelHints, resized: Sequence[int] | None) -> Resolution:
    candidates = []
    for axis, kind in ((1, "NLC"), (2, "NCL")):
        channels = shape[3 - axis]
        for prefix in hints.prefix_tokens:
            grid = token_grid(shape[axis] - prefix, hints.input_hw, hints.patch_grid)
            if grid is not None:
                candidates.append((axis, Layout(kind, grid=grid, prefix=prefix), (channels, *grid)))
                break
    if not candidates:
        return Resolution(None, tuple(shape[1:]), f"output {_shape_text(shape)} is no token grid at the input's aspect ratio, not a map")
    evidence = "tokens factor as the input's grid"
    changing = _changing_axes(shape, resized)
    if changing is not None:
        # a token axis grows with the input; one that does not (an ECA conv over channels, a latent array) is no grid
        candidates = [c for c in candidates if c[0] in changing]
        if not candidates:
            return Resolution(None, tuple(shape[1:]), f"output {_shape_text(shape)} does not change with the input size, not a token grid")
    if len(candidates) > 1 and changing and len(changing) == 1:
        candidates = [c for c in candidates if c[0] == changing[0]] or candidates
        evidence = "token axis changes with the input size"
    if len(candidates) > 1:
        evidence = "both axes factor, (B, N, C) assumed"
    _, layout, map_shape = candidates[0]
    note = f"; {layout.prefix} prefix token(s) left out" if layout.prefix else ""
    return Resolution(Layout(layout.kind, layout.grid, layout.prefix, evidence + note), map_shape)


def resolve_layout(
    output: torch.Tensor,
    hints: ModelHints,
    resized_shape: Sequence[int] | None = None,
    module: nn.Module | None = None,
    name: str = "",
) -> Resolution:
    """Decide how ``output`` (probed with batch ``hints.batch``) reads as a (C, H, W) map.

    ``resized_shape``: the same module's output shape at a second input size
    (``None`` when that probe was impossible); ``module``: the module that
    returned ``output``, for type evidence; ``name``: its name, for timm's
    stage ``output_fmt``.
    """
    shape = tuple(int(s) for s in output.shape)
    if output.ndim < 3 or output.ndim > 4:
        return Resolution(None, shape[1:] or None, f"output is {output.ndim}-D ({_shape_text(shape)}), not a spatial map")
    if shape[0] != hints.batch:
        if shape[0] > hints.batch and shape[0] % hints.batch == 0:
            return Resolution(None, shape[1:], f"window-partitioned: leading dimension {shape[0]} is {shape[0] // hints.batch} x the batch")
        return Resolution(None, shape[1:], f"leading dimension {shape[0]} does not follow the batch of {hints.batch}")
    if output.ndim == 4:
        return _resolve_4d(shape, hints, resized_shape, module, hints.stage_formats.get(name), hints.stage_channels.get(name))
    return _resolve_3d(shape, hints, resized_shape)
