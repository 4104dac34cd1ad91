"""Training checkpoints that ``torch.load(weights_only=True)`` can read, with everything needed to resume.

Why only tensors and plain containers: a checkpoint is a file people download and share; ``weights_only=True``
refuses arbitrary pickled objects, so the RNG states are stored as tensors/ints and the options as a plain dict.
Files are written with ``elsa.io.torch_save`` (temporary file + rename): a crash leaves the previous complete file.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from ..io import torch_save

CHECKPOINT_VERSION = 1


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


def save_checkpoint(checkpoint: Dict[str, Any], path: os.PathLike) -> None:
    """Write a training checkpoint atomically (the old file stays intact until the new one is complete)."""
    torch_save(dict(checkpoint, version=CHECKPOINT_VERSION), path)


def load_training_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by ``elsa train`` for ``--resume`` (weights_only=True; clear errors)."""
    from ..models._checkpoint import CheckpointError

    if not os.path.isfile(path):
        raise CheckpointError(f"--resume file {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        raise CheckpointError(f"--resume file {str(path)!r} is not a readable checkpoint: {err}") from err
    missing = [k for k in ("state_dict", "optimizer", "epoch") if k not in ckpt] if isinstance(ckpt, dict) else ["*"]
    if missing:
        raise CheckpointError(f"--resume file {str(path)!r} is not an `elsa train` checkpoint (no {missing}); "
                              f"to start from weights only, use --initial-checkpoint")
    return ckpt
