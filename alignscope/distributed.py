"""Running one analysis over several processes or machines with ``torch.distributed``.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``, e.g. SLURM with those exported)
:func:`analyze` joins the process group itself: ``gloo`` on CPU, ``nccl``
on CUDA, each rank on ``cuda:LOCAL_RANK``.

What is split and what is reduced:

- images are cut into batches by position (batch k = images [kB, (k+1)B)
  of the seeded order); rank r measures batches k with k % world == r. The
  chance partner of an image is inside its own batch (a batch of one image
  carries its partner along), so pairs are the same for any number of ranks;
- each rank's statistics (count, sum, sum of squares per quantity, float64)
  are summed with one ``all_reduce``; the per-image rows and image lists are
  gathered to rank 0;
- fitted alignments are calibrated by every rank on the whole calibration
  split (small by design), so all ranks hold the same fits;
- only rank 0 writes files, prints and shows progress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current_context(), device


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
