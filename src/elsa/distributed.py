"""Distributed set-up shared by ``elsa train``, ``elsa det`` and ``elsa seg`` (e.g. ``torchrun --nproc_per_node=N -m
elsa train ...``): process group from torchrun's environment variables (nccl on CUDA, gloo on CPU), the device of
each rank, and small reduction helpers.

Why one module: every task launches the same way under torchrun, so the rank/device rules live in one place; every
metric shown to the user must be the same number on every rank (reduced), and every collective must be called by
all ranks, so the engines go through these few functions.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """``device`` as given, or (None / ``"auto"``) cuda when available, else cpu; a bare ``cuda`` means
    cuda:LOCAL_RANK, so under torchrun each rank takes its own GPU. Malformed names and CUDA asked for where there
    is none raise a ValueError naming ``--device``. Every command resolves its device here."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: {device!r} is not a device name (expected e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)
    _logger.info("distributed: rank %d of %d on %s (%s)", info.rank, info.world_size, dev, dist.get_backend())
    return info


def cleanup_distributed() -> None:
    """Destroy the process group (if any) so the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sum a few numbers over all ranks (float64 on the rank's device); identity for one process."""
    if not info.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any, info: DistInfo) -> List[Any]:
    """The ``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op for one process)."""
    if info.distributed:
        dist.barrier()
