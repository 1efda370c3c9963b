"""Where the time of an analysis goes: a phase stopwatch cheap enough to leave on.

Phases used by the engine: ``loading`` (reading and preparing images),
``forward`` (model passes up to the deepest hooked layer), ``warping``
(warps of images and inverse warps of feature maps) and ``metrics``
(masked norms and statistics). On CUDA, work is asynchronous: with
``synchronize=True`` each phase waits for the device before it stops the
clock (the benchmark does this; a plain analysis does not, so its phase
split on a GPU is only indicative).

The engine opens ``loading`` once before it reads each batch and once more
when the stream runs out, so a :class:`BoundaryTimer` sees the batch
boundaries of an analysis from outside (the benchmark interleaves its bare
forward passes there).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self, device: torch.device | None = None, synchronize: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = synchronize and device is not None and device.type == "cuda"
        self._device = device

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize(self._device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize(self._device)
            self.seconds[phase] += time.perf_counter() - started

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


class BoundaryTimer(PhaseTimer):
    """A :class:`PhaseTimer` that calls ``on_boundary()`` whenever ``phase`` opens, before its clock starts.

    With the default ``phase="loading"`` an analysis of n batches makes n + 1
    calls: before each batch is read, and once after the last one. Time spent
    inside ``on_boundary`` is counted in no phase.
    """

    def __init__(self, on_boundary: Callable[[], None], device: torch.device | None = None, synchronize: bool = False,
                 phase: str = "loading") -> None:
        super().__init__(device, synchronize)
        self._on_boundary = on_boundary
        self._boundary_phase = phase

    def __call__(self, phase: str):  # type: ignore[override]
        if phase == self._boundary_phase:
            self._on_boundary()
        return super().__call__(phase)


class _Null:
    """A timer that measures nothing (the default when nobody asks)."""

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        yield


NULL_TIMER = _Null()
