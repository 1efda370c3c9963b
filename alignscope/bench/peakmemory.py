"""Peak resident memory of a command, measured so that it owes nothing to the process that asks.

Why a launcher: on Linux, ``exec`` folds the high-water mark of the address
space it replaces into the new process's ``ru_maxrss``. A command started
by fork (or vfork) and exec from a large Python process (a benchmark, a
test runner) therefore reports at least its parent's peak: a 2 GiB parent
made every child "peak" at 2 GiB. Here the command runs as the child of a
small launcher (``python -S``, standard library only), which waits for it
and reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the command's own peak,
or the launcher's if that were larger. The launcher's peak (its
``VmHWM``, about 10 MiB) is reported as that floor.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import AlignscopeError

SOURCE = ("ru_maxrss of the command, a child of a small launcher process (python -S) that reads it with "
          "getrusage(RUSAGE_CHILDREN); the launcher's own peak (launcher_mb) is a floor")

_LAUNCHER = r"""
import json, resource, subprocess, sys, time
argv, result = json.loads(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
code = subprocess.call(argv)
seconds = time.perf_counter() - started
own = None
try:
    with open("/proc/self/status") as status:
        own = next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
except OSError:
    pass
with open(result, "w") as out:
    json.dump({"returncode": code, "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
               "launcher_kib": own, "seconds": seconds}, out)
"""


@dataclass
class CommandRun:
    """A finished command: its peak RSS and wall time, exit code and captured output."""

    peak_mb: float
    launcher_mb: float | None
    seconds: float
    returncode: int
    stdout: str
    stderr: str

    def succeeded(self, what: str) -> "CommandRun":
        """Raise with the command's last error line unless it exited 0."""
        if self.returncode < 0:  # a signal: the child's last output line is whatever it printed before it died
            name = _signal_name(-self.returncode)
            hint = " (the kernel's out-of-memory killer sends this; free memory or run fewer jobs)" if name == "SIGKILL" else ""
            raise AlignscopeError(f"{what} was killed by {name}{hint}")
        if self.returncode != 0:
            lines = [line for line in self.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error")]
            shown = errors[-1] if errors else lines[-1] if lines else "no error output"
            raise AlignscopeError(f"{what} failed (exit {self.returncode}): {shown}")
        return self


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _maxrss_mb(value: int) -> float:
    return value / 2**20 if sys.platform == "darwin" else value / 1024.0  # macOS reports bytes, Linux KiB


def run_measured(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = None) -> CommandRun:
    """Run ``argv`` in a fresh process behind the launcher; its stdout and stderr are captured.

    ``env`` replaces the environment (``None``: inherit this one). Peak RSS in MiB.
    """
    if sys.platform == "win32":
        raise AlignscopeError("peak memory of a child process is measured with getrusage, which Windows lacks")
    with tempfile.TemporaryDirectory(prefix="alignscope-peak-") as tmp:
        result = Path(tmp) / "peak.json"
        # run in the scratch folder: "python -m alignscope" must not import a source folder from the caller's one
        done = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, json.dumps(list(argv)), str(result)],
                              capture_output=True, text=True, env=None if env is None else dict(env), timeout=timeout,
                              cwd=tmp)
        if not result.exists():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise AlignscopeError(f"the memory launcher failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
        measured = json.loads(result.read_text())
    launcher = measured["launcher_kib"]
    return CommandRun(peak_mb=_maxrss_mb(measured["maxrss"]), launcher_mb=None if launcher is None else launcher / 1024.0,
                      seconds=measured["seconds"], returncode=measured["returncode"], stdout=done.stdout, stderr=done.stderr)
