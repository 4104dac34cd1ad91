"""What a training run must save to continue exactly where it stopped, saved and restored in one way for every task:
model, optimizer, scheduler, grad scaler, EMA, epoch/iteration, the RNG states of every rank, and a few plain
values of the task (``extra``: best metric, class names, recipe, run options).

Why only tensors and plain containers: checkpoints are read with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects, so the RNG states are stored as tensors/ints and the options as plain dicts.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import fit_state_dict
from .runtime import Runtime

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """The ``worker_init_fn`` of every task's training loader: the one seeding rule for data workers.

    PyTorch already seeds each worker's torch, ``random`` and NumPy from the loader's base seed (drawn from the main
    process's torch RNG, which the train state saves); a transform with its own generator (a ``reseed(seed)``
    method, e.g. the segmentation pipeline's) gets that worker's seed too, so no two workers share a stream and a
    run's augmentation depends on its seed alone."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    while dataset is not None:
        transform = getattr(dataset, "transform", None) or getattr(dataset, "transforms", None)
        if hasattr(transform, "reseed"):
            transform.reseed(info.seed % 2 ** 32)
            return
        dataset = getattr(dataset, "dataset", None)  # through wrappers (SkipUnreadable, Subset)


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and numbers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class TrainState:
    """The resumable state of a run. ``model`` is the bare model (not DDP-wrapped); ``ema`` a timm ``ModelEmaV3``
    (or anything with ``.module``); ``scheduler`` a timm scheduler or a torch LR scheduler."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Any = None
    epoch: int = 0           # epochs finished
    iteration: int = 0       # optimizer steps taken
    extra: Dict[str, Any] = field(default_factory=dict)

    def state_dict(self, rng: Optional[List[Dict[str, Any]]] = None, weights_only: bool = False) -> Dict[str, Any]:
        """The checkpoint content: ``rng`` is the list of every rank's ``get_rng_state()`` (gathered by the
        caller, a collective); ``weights_only`` keeps just the model, counters and ``extra`` (periodic
        snapshots)."""
        ckpt: Dict[str, Any] = {"model": self.model.state_dict(), "epoch": self.epoch, "iteration": self.iteration}
        if not weights_only:
            ckpt["optimizer"] = self.optimizer.state_dict()
            if self.scheduler is not None:
                ckpt["scheduler"] = self.scheduler.state_dict()
            if self.scaler is not None:
                ckpt["scaler"] = self.scaler.state_dict()
            if self.ema is not None:
                ckpt["model_ema"] = self.ema.module.state_dict()
            if rng is not None:
                ckpt["rng"] = rng
        ckpt.update(self.extra)
        return ckpt

    def load_state_dict(self, ckpt: Dict[str, Any], runtime: Runtime) -> bool:
        """Restore everything ``state_dict`` saved (the model strictly). ``extra`` is left as the caller set it
        (this invocation's recipe and options; the task reads what it resumes, e.g. a best metric). Returns whether the RNG states were restored (only when the number of processes is the same; otherwise
        the caller reseeds)."""
        fit_state_dict(self.model, ckpt["model"])  # strict, one short line for a file of another model
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if "model_ema" in ckpt:
                fit_state_dict(self.ema.module, ckpt["model_ema"])
            else:
                _logger.warning("--resume: the checkpoint has no EMA weights; EMA restarts from the model")
                self.ema.set(self.model)
        self.epoch = int(ckpt.get("epoch", 0))
        self.iteration = int(ckpt.get("iteration", 0))
        rng = ckpt.get("rng") or []
        if len(rng) == runtime.world_size:
            set_rng_state(rng[runtime.rank])
            return True
        _logger.warning("--resume: RNG states saved for %d process(es), running %d; reseeding",
                        len(rng), runtime.world_size)
        return False
