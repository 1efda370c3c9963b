"""Running one analysis over several processes or machines with ``torch.distributed``.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``, e.g. SLURM with those exported)
:func:`analyze` joins the process group itself: ``gloo`` on CPU, ``nccl``
on CUDA, each rank on ``cuda:LOCAL_RANK``.

What is split and what is reduced:

- images are cut into batches by position (batch k = images [kB, (k+1)B)
  of the seeded order); rank r measures batches k with k % world == r. The
  chance partner of an image is the image before it in the whole order (a
  batch carries the one before its first image along), so pairs are the same
  for any batch size and any number of ranks;
- each rank's statistics (count, sum, sum of squares per quantity, float64)
  are summed with one ``all_reduce``; the per-image rows and image lists are
  gathered to rank 0;
- fitted alignments are calibrated by every rank on the whole calibration
  split (small by design), so all ranks hold the same fits;
- only rank 0 writes files, prints and shows progress.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import AlignscopeError, UsageError

log = logging.getLogger("alignscope")
TIMEOUT_VARIABLE = "ALIGNSCOPE_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE set by a launcher (1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current_context() -> DistributedContext:
    """The context of an initialized process group, or a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistributedContext()


def init_from_environment(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group a launcher describes; on CUDA each rank takes ``cuda:LOCAL_RANK``."""
    if launched_world_size() <= 1 or not dist.is_available():
        return current_context(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _join_group(device)
    return current_context(), device


def join_timeout_seconds() -> float:
    """How long to wait for the other ranks: ``ALIGNSCOPE_DIST_TIMEOUT`` seconds (default 120)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "120")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise UsageError(f"{TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds")
    return value


def _join_group(device: torch.device) -> None:
    """Join the launcher's group, saying what is awaited; a stray WORLD_SIZE fails fast or times out clearly."""
    world = launched_world_size()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: alignscope "
            "joins a process group only when a launcher such as torchrun starts it; unset WORLD_SIZE and RANK to run "
            "in one process")
    timeout = join_timeout_seconds()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    log.info("rank %s of %d: waiting up to %.0f s for the other ranks at %s (WORLD_SIZE is set; unset it to run in "
             "one process)", os.environ["RANK"], world, timeout, where)
    try:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, TimeoutError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AlignscopeError(
            f"could not form the process group of {world} ranks at {where} within {timeout:.0f} s ({reason}); start "
            f"every rank with torchrun, raise {TIMEOUT_VARIABLE}, or unset WORLD_SIZE and RANK to run in one process") from None


def all_reduce_sum(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Sum float64 CPU tensors over all ranks in place, with one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].reshape(tensor.shape))
        offset += tensor.numel()


def gather_to_main(obj, context: DistributedContext) -> list:
    """Every rank's ``obj`` on rank 0 (in rank order); ``[]`` elsewhere."""
    if not context.active:
        return [obj]
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if context.is_main else []
