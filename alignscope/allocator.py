"""glibc malloc settings that keep PyTorch's large CPU tensors off the mmap path.

By default glibc serves allocations above a (dynamic, at most 32 MiB)
threshold with fresh ``mmap`` calls and returns them to the system on
``free``. A CNN forward pass on a batch allocates and frees activations of
tens of MiB again and again, so every one of them is page-faulted anew: on
the 2-core development machine this made a ResNet-50 analysis spend a third
of its time in the kernel (see the README's Performance section). Keeping
freed memory in the heap avoids that. The variables are read when the
process starts, so the CLI re-executes itself once with them set;
``ALIGNSCOPE_NO_MALLOC_TUNING=1`` turns this off. Python API users can
export the same variables before starting Python.
"""
from __future__ import annotations

import os
import platform
import sys

TUNED_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}
MARKER = "ALIGNSCOPE_MALLOC_TUNED"
OPT_OUT = "ALIGNSCOPE_NO_MALLOC_TUNING"


def should_reexec(environ: dict | None = None) -> bool:
    """On glibc Linux, when not tuned yet, not opted out and no malloc variable was chosen by the user."""
    env = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if env.get(MARKER) or env.get(OPT_OUT) or any(k in env for k in TUNED_ENVIRONMENT):
        return False
    return True


def reexec_with_tuned_malloc(args: list[str]) -> None:
    """Replace this process by ``python -m alignscope ARGS`` with the tuned variables (returns only if skipped)."""
    if not should_reexec():
        return
    env = dict(os.environ, **TUNED_ENVIRONMENT, **{MARKER: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "alignscope", *args], env)
