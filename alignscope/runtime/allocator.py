"""glibc malloc settings that keep PyTorch's large CPU tensors off the mmap path.

By default glibc serves allocations above a (dynamic, at most 32 MiB)
threshold with fresh ``mmap`` calls and returns them to the system on
``free``. A CNN forward pass on a batch allocates and frees activations of
tens of MiB again and again, so every one of them is page-faulted anew: on
the 2-core development machine this made a ResNet-50 analysis spend a third
of its time in the kernel (see docs/performance.md). Keeping
freed memory in the heap avoids that.

:func:`tune_malloc` sets the three thresholds with ``mallopt`` at run time,
in the running process (no re-execution, no environment variables needed).
It is called once by :func:`alignscope.analyze` and by the command line
before the first large tensor exists; calling it again does nothing. It is
skipped on anything but glibc Linux, when ``ALIGNSCOPE_NO_MALLOC_TUNING=1``
is set, or when the user chose one of glibc's ``MALLOC_*_`` variables
themselves (their choice wins).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>, and the values they are set to.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
TUNED_SETTINGS = {
    # mallopt takes a C int: 2 GiB - 1 is the largest threshold it can be given
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 2**31 - 1),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    "M_TOP_PAD": (M_TOP_PAD, 2**30),
}
# The same settings as glibc environment variables (read only when a process starts).
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OPT_OUT = "ALIGNSCOPE_NO_MALLOC_TUNING"

_state: dict[str, object] = {}
_onednn: dict[str, object] = {}


def tuning_skipped_because(environ: dict | None = None) -> str:
    """Why :func:`tune_malloc` would not tune here (``""`` when it would)."""
    env = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc Linux"
    if env.get(OPT_OUT, "") not in ("", "0"):
        return f"{OPT_OUT} is set"
    chosen = [k for k in USER_VARIABLES if k in env]
    if chosen:
        return f"user set {', '.join(chosen)}"
    return ""


def tune_malloc() -> dict[str, object]:
    """Apply :data:`TUNED_SETTINGS` once per process; returns what was done.

    The result (also kept for :func:`malloc_tuning`) is ``{"tuned": bool,
    "settings": {name: value}, "reason": why not}``; a setting glibc refuses
    is left out of ``settings``.
    """
    if _state:
        return dict(_state)
    reason = tuning_skipped_because()
    applied: dict[str, int] = {}
    if not reason:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            for name, (param, value) in TUNED_SETTINGS.items():
                if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
                    applied[name] = value
        except (OSError, AttributeError) as exc:  # no libc to load, or no mallopt in it
            reason = f"mallopt unavailable ({exc})"
    _state.update(tuned=bool(applied), settings=applied, reason=reason)
    return dict(_state)


#: oneDNN's primitive cache: what the command line bounds it to, and the variables that set it.
ONEDNN_CACHE_CAPACITY = 128
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def bound_onednn_cache() -> str | None:
    """Bound oneDNN's primitive cache (default 1024 primitives) to :data:`ONEDNN_CACHE_CAPACITY`; the value set.

    Every convolution shape the analysis feeds (batches, chunks of round trips, partners) keeps a
    compiled primitive and its scratch memory: on the default job about 150 MiB of the peak, on 64
    images about 250 MiB. 128 primitives keep the default model's shapes of one batch without
    measurable slowing (docs/performance.md). oneDNN reads the variable when it first runs, so this
    must happen before the first forward pass; the command line calls it first thing. Nothing is
    changed when the user set one of :data:`ONEDNN_CACHE_VARIABLES` (their choice wins) or
    ``ALIGNSCOPE_NO_MALLOC_TUNING=1``. The Python API leaves the caller's process alone.
    """
    if os.environ.get(OPT_OUT) == "1" or any(name in os.environ for name in ONEDNN_CACHE_VARIABLES):
        return None
    os.environ[ONEDNN_CACHE_VARIABLES[0]] = str(ONEDNN_CACHE_CAPACITY)
    _onednn["onednn_primitive_cache_capacity"] = ONEDNN_CACHE_CAPACITY
    return os.environ[ONEDNN_CACHE_VARIABLES[0]]


def malloc_tuning() -> dict[str, object]:
    """What :func:`tune_malloc` (and :func:`bound_onednn_cache`) did in this process (``{}`` if not called)."""
    return dict(_state) | dict(_onednn)


def release_free_memory() -> bool:
    """Return the heap's free memory to the system (glibc ``malloc_trim``) after a phase with a high peak.

    The tuning keeps freed memory in the heap, which suits the analysis's
    repeated batches of one size; the set-up's probes (other sizes, autograd
    graphs) leave free memory of other shapes behind, which the analysis
    would add to. Returns whether anything was done (glibc only, and only
    when the tuning is in effect).
    """
    if not _state.get("tuned"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        return False
    return True
