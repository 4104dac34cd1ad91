"""Kept for imports from before ``elsa.engine``: the distributed set-up now lives in ``elsa.engine.runtime``."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from .engine.runtime import Runtime, cleanup_runtime, init_runtime, resolve_device

DistInfo = Runtime  # the runtime is what ``DistInfo`` was, plus the AMP policy

__all__ = ["DistInfo", "resolve_device", "init_distributed", "cleanup_distributed", "all_reduce_sum",
           "all_gather_object", "barrier"]


def init_distributed(device: Optional[str] = None) -> Runtime:
    return init_runtime(device)


cleanup_distributed = cleanup_runtime


def all_reduce_sum(values: Sequence[float], info: Runtime) -> List[float]:
    return info.all_reduce_sum(values)


def all_gather_object(obj: Any, info: Runtime) -> List[Any]:
    return info.all_gather_object(obj)


def barrier(info: Runtime) -> None:
    info.barrier()
