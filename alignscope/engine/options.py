"""How a run executes, said once: :class:`RunOptions` (autocast, memory format, output row, placement rows,
per-image rows).

What is measured lives elsewhere: the model in :class:`~alignscope.model.options.ModelOptions`
(with the device), the pairs in :class:`~alignscope.inputs.options.PairOptions`, the fits in
:class:`~alignscope.fit.fitting.FitRequest`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError, UsageTypeError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str | None) -> torch.dtype | None:
    """``None``/``"off"`` -> no autocast; ``"bf16"`` / ``"fp16"`` -> that dtype."""
    if amp in (None, "off", "none"):
        return None
    if amp not in AMP_DTYPES:
        raise UsageError(f"amp must be one of off, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return AMP_DTYPES[amp]


@dataclass(frozen=True)
class RunOptions:
    """``amp``: ``"bf16"`` | ``"fp16"`` runs the model under autocast (maps compared in float32, statistics in
    float64); ``channels_last``: NHWC tensors for the model (``None``: on for CUDA); ``output``: measure the
    output row where the model has a classifier head; ``placement``: the placement rows (an exact STN at each
    layer, measured on the prediction; needs ``output``); ``per_image``: keep one row per image too; ``lie``:
    Lie derivatives along these generators (``True``: all six; see :mod:`alignscope.measure.lie`)."""

    amp: str | None = None
    channels_last: bool | None = None
    output: bool = True
    per_image: bool = False
    placement: bool = False
    lie: bool | str | tuple[str, ...] = ()

    def __post_init__(self) -> None:
        resolve_amp(self.amp)  # a bad value fails when the options are made
        object.__setattr__(self, "lie", resolve_generators(self.lie))
        for name in ("output", "per_image", "placement"):
            if not isinstance(getattr(self, name), bool):
                raise UsageTypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.placement and not self.output:
            raise UsageError("placement compares the model's predictions, so it needs the output row; drop output=False "
                             "(--no-output) or placement=True (--placement)")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_amp(self.amp)

    def channels_last_on(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.channels_last is None else bool(self.channels_last)


def resolve_generators(lie: bool | str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``True`` -> every generator; ``False``/``None``/``()`` -> none; names (or one name) -> those, checked."""
    from ..geometry.generators import GENERATORS

    if lie is None or lie is False:
        return ()
    if lie is True:
        return tuple(GENERATORS)
    if not isinstance(lie, (str, list, tuple)):
        raise UsageTypeError(f"lie must be True, False or generator names, not {type(lie).__name__}")
    names = (lie,) if isinstance(lie, str) else tuple(lie)
    unknown = [name for name in names if name not in GENERATORS]
    if unknown:
        raise UsageError(f"unknown Lie generator(s) {', '.join(map(repr, unknown))}; pass lie=True or names among "
                         f"{', '.join(GENERATORS)}")
    return tuple(dict.fromkeys(names))


def refuse_both(what: str, given: object | None, keywords: dict[str, tuple[object, object]]) -> None:
    """Refuse keywords set beside the option object ``what`` that covers them (``keywords``: name -> (value, default))."""
    if given is None:
        return
    both = [name for name, (value, default) in keywords.items()
            if not (value is default or (type(value) is type(default) and value == default))]
    if both:
        raise UsageError(f"{', '.join(both)} given beside {what}=...; set each value in one place (in the {what} object)")
