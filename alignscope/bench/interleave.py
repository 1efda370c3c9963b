"""Two workloads timed batch by batch in turn, and whether the machine let them be timed fairly.

The benchmark compares (A) bare forward passes with (B) the analysis. Timed
as whole passes one after the other, a burst of load from other processes
can land on one and not the other and skew B / A. Interleaved, batch k's
bare forwards run immediately before the analysis reads batch k, so A_k and
B_k are seconds apart and see about the same load. All times are wall-clock
seconds.

:class:`Interleaver` does the bookkeeping with an injectable clock;
:func:`summarize_passes` turns passes into the reported figures (ratio of
sums, per-batch spread, minimum and median of the whole-pass times);
:func:`assess_noise` says when the figures cannot be trusted.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import AlignscopeError

NOISE_SPREAD = 0.20
"""Spread between repeats, (max - min) / min, above which a run is called noisy."""


@dataclass
class PassTiming:
    """One interleaved pass: ``forward[k]`` = A_k and ``analysis[k]`` = B_k, seconds, for batches k = 0..n-1."""

    forward: list[float]
    analysis: list[float]

    @property
    def forward_total(self) -> float:
        return sum(self.forward)

    @property
    def analysis_total(self) -> float:
        return sum(self.analysis)


class Interleaver:
    """Times A_k, then B_k, for each batch, driven by B's batch boundaries.

    Call :meth:`boundary` when B is about to start batch k (k = 0..n-1) and
    once more after its last batch: n + 1 calls in all. Each call closes the
    running B_{k-1}; for k < n it then builds A's inputs with ``prepare(k)``
    (not timed), times ``forward(inputs)`` as A_k and starts B_k's clock.
    ``sync`` runs before every clock reading (waiting for an asynchronous
    device); ``clock`` returns seconds.
    """

    def __init__(self, n_batches: int, forward: Callable[[Any], None], prepare: Callable[[int], Any] = lambda k: k,
                 clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None) -> None:
        if n_batches < 1:
            raise AlignscopeError(f"nothing to interleave: {n_batches} batches")
        self.n_batches = n_batches
        self._forward, self._prepare, self._clock, self._sync = forward, prepare, clock, sync
        self._forward_seconds: list[float] = []
        self._analysis_seconds: list[float] = []
        self._opened: float | None = None
        self.calls = 0

    def _now(self) -> float:
        self._sync()
        return self._clock()

    def boundary(self) -> None:
        self.calls += 1
        if self._opened is not None:
            self._analysis_seconds.append(self._now() - self._opened)
            self._opened = None
        k = len(self._forward_seconds)
        if k >= self.n_batches:
            return  # after the last batch; more calls than that are caught by result()
        inputs = self._prepare(k)
        started = self._now()
        self._forward(inputs)
        ended = self._now()
        self._forward_seconds.append(ended - started)
        self._opened = ended

    def result(self) -> PassTiming:
        """The finished pass; an error unless B crossed exactly n + 1 boundaries (else A and B did not pair up)."""
        expected = self.n_batches + 1
        if self.calls != expected or len(self._analysis_seconds) != self.n_batches:
            raise AlignscopeError(
                f"the analysis crossed {self.calls} batch boundaries where {expected} were expected for "
                f"{self.n_batches} batches, so its batches did not pair up with the bare forward passes; "
                "the benchmark cannot time it (report this with the command line)")
        return PassTiming(list(self._forward_seconds), list(self._analysis_seconds))


def repeat_spread(values: Sequence[float]) -> float | None:
    """(max - min) / min of whole-pass times; ``None`` with fewer than two values (nothing to compare)."""
    if len(values) < 2:
        return None
    low = min(values)
    if low <= 0:
        raise AlignscopeError(f"a pass took {low} s; timings must be positive")
    return (max(values) - low) / low


def summarize_passes(passes: Sequence[PassTiming]) -> dict:
    """The reported figures of timed passes (seconds; ratios B / A).

    ``overhead_ratio``: sum of all B_k over sum of all A_k (ratio of sums, so
    a long batch weighs what it costs); ``batch_ratio``: min / median / max
    of B_k / A_k over every batch of every pass and ``spread`` = (max - min)
    / median; ``forward`` and ``analysis``: min, median and all whole-pass
    times; ``pass_ratios``: B / A per pass.
    """
    if not passes:
        raise AlignscopeError("no timed passes to summarize")
    forward_totals = [p.forward_total for p in passes]
    analysis_totals = [p.analysis_total for p in passes]
    batch_pairs = [(a, b) for p in passes for a, b in zip(p.forward, p.analysis)]
    if any(a <= 0 for a, _ in batch_pairs):
        raise AlignscopeError("a batch's bare forward passes took no measurable time; the ratio is undefined")
    ratios = [b / a for a, b in batch_pairs]
    median_ratio = statistics.median(ratios)
    return {
        "overhead_ratio": sum(analysis_totals) / sum(forward_totals),
        "batch_ratio": {"min": min(ratios), "median": median_ratio, "max": max(ratios),
                        "spread": (max(ratios) - min(ratios)) / median_ratio, "batches": len(ratios)},
        "forward": {"min": min(forward_totals), "median": statistics.median(forward_totals), "all": forward_totals},
        "analysis": {"min": min(analysis_totals), "median": statistics.median(analysis_totals), "all": analysis_totals},
        "pass_ratios": [b / a for a, b in zip(forward_totals, analysis_totals)],
    }


LOAD_MARGIN = 0.25  # fraction of the cores the load may exceed them by before a run counts as shared


def load_average() -> float | None:
    """The 1-minute load average (runnable and uninterruptible tasks), or ``None`` where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def assess_noise(summary: dict, load_samples: Sequence[float | None], cores: int | None,
                 limit: float = NOISE_SPREAD) -> dict:
    """Whether the timings of ``summary`` (from :func:`summarize_passes`) can be trusted.

    Noisy when the whole-pass times of A, of B or their ratio spread between
    repeats by more than ``limit`` ((max - min) / min), or when a 1-minute
    load average sample exceeds ``cores`` by more than ``LOAD_MARGIN`` of
    them (the benchmark's own torch threads keep the load near the core
    count; a quarter more runnable tasks on average means other processes
    took a share of the CPU). ``unchecked`` lists what could not be
    checked (one repeat; no load average), which is not the same as quiet.
    """
    spreads = {"forward": repeat_spread(summary["forward"]["all"]),
               "analysis": repeat_spread(summary["analysis"]["all"]),
               "ratio": repeat_spread(summary["pass_ratios"])}
    names = {"forward": "bare forward (A)", "analysis": "analysis (B)", "ratio": "B/A"}
    reasons = [f"{names[k]} whole-pass times spread {v:.0%} between repeats (limit {limit:.0%})"
               for k, v in spreads.items() if v is not None and v > limit]
    unchecked = []
    if all(v is None for v in spreads.values()):
        unchecked.append("spread between repeats (one repeat; use --repeats 3 or more)")
    loads = [v for v in load_samples if v is not None]
    peak_load = max(loads) if loads else None
    if peak_load is None or not cores:
        unchecked.append("load average (not available on this system)")
    elif peak_load > cores * (1 + LOAD_MARGIN):
        reasons.append(f"load average reached {peak_load:.2f} on {cores} cores (other processes competed for the CPU)")
    return {
        "noisy": bool(reasons),
        "reasons": reasons,
        "unchecked": unchecked,
        "spread_limit": limit,
        "repeat_spread": spreads,
        "load_average": {"samples": list(load_samples), "max": peak_load, "cores": cores},
    }
