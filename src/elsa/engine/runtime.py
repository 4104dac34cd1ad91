"""Where a training or evaluation process runs: rank, world size, device, the autocast dtype and grad-scaler policy,
SyncBN/DDP wrapping, and the few collectives every task needs (``torchrun --nproc_per_node=N -m elsa ...``).

Why one module: every task launches the same way under torchrun, so the rank/device/AMP rules live in one place;
every metric shown to the user must be the same number on every rank (reduced), and every collective must be
called by all ranks, so the tasks go through these few functions.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, ContextManager, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

_logger = logging.getLogger(__name__)

_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Runtime:
    """This process: rank, world size, local rank, its device, and its autocast dtype (None: full precision)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    amp_dtype: Optional[torch.dtype] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, prints and writes files."""
        return self.rank == 0

    def autocast(self) -> ContextManager:
        """The autocast context of this run (a no-op context without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A loss scaler where one is needed (float16 autocast on CUDA), else None."""
        if self.amp_dtype == torch.float16 and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """``model`` moved to the device and, under torchrun, in DDP (BatchNorm -> SyncBatchNorm first with
        ``sync_bn``, on CUDA: PyTorch's SyncBatchNorm has no CPU kernel). Returns ``model`` itself for one
        process."""
        model.to(self.device)
        if not self.distributed:
            return model
        if sync_bn and self.device.type != "cuda":
            _logger.info("sync-bn: SyncBatchNorm runs on GPUs only; this %s run keeps BatchNorm", self.device.type)
        elif sync_bn:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
                _logger.info("BatchNorm layers converted to SyncBatchNorm")
            else:
                _logger.info("sync-bn: the model has no BatchNorm; nothing to convert")
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------------------------------------ collectives
    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        """Sum a few numbers over all ranks (float64 on the rank's device); identity for one process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (reduced on the rank's device, returned where ``t`` was)."""
        if not self.distributed:
            return t
        out = t.to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_gather_object(self, obj: Any) -> List[Any]:
        """The ``obj`` of every rank, in rank order (``[obj]`` for one process)."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for all ranks (no-op for one process)."""
        if self.distributed:
            dist.barrier()

    def shard(self, n: int) -> List[int]:
        """Evaluation indices of this rank: every sample exactly once over all ranks (no padding duplicates)."""
        return list(range(self.rank, n, self.world_size))


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


def amp_dtype(amp: bool, device: torch.device, dtype: str = "float16", cpu: bool = True) -> Optional[torch.dtype]:
    """The one autocast policy: None without ``amp``; on CUDA ``dtype`` (float16, with loss scaling, or bfloat16);
    on CPU bfloat16 when ``cpu`` (float16 autocast is a CUDA feature), else none (the detection and segmentation
    recipes, whose official runs used fp16 on GPUs only)."""
    if not amp:
        return None
    if dtype not in _AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {sorted(_AMP_DTYPES)}, got {dtype!r}")
    if device.type == "cuda":
        return _AMP_DTYPES[dtype]
    if not cpu:
        return None
    if dtype != "bfloat16":
        _logger.info("--amp on %s uses bfloat16 autocast (float16 autocast is a CUDA feature)", device.type)
    return torch.bfloat16


def init_runtime(device: Optional[str] = None, amp: bool = False, amp_dtype_name: str = "float16",
                 amp_on_cpu: bool = True) -> Runtime:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    dtype = amp_dtype(amp, dev, amp_dtype_name, cpu=amp_on_cpu)
    if world_size <= 1:
        return Runtime(0, 1, 0, dev, False, dtype)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    rt = Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, dtype)
    _logger.info("distributed: rank %d of %d on %s (%s)", rt.rank, rt.world_size, dev, dist.get_backend())
    return rt


def cleanup_runtime() -> None:
    """Destroy the process group (if any) so the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile and our own thin wrappers (anything holding the real
    model as ``.module``, e.g. ``ForwardTrain``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
