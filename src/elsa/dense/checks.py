"""Checks shared by ``elsa det`` and ``elsa seg`` before a checkpoint is used: a file from another model must fail
with one line that says which model it is for, not with a page of ``size mismatch`` lines."""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch.nn as nn

from ..checkpoint import CheckpointError


def check_resume_fits(checkpoint: Dict[str, Any], model: nn.Module, path: Union[str, os.PathLike],
                      recipe_name: str) -> None:
    """Raise a CheckpointError naming ``path`` and the recipe it was written with when its ``model`` weights do not
    have this model's names and shapes (``--resume`` into an output folder of another run)."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return  # load_training_checkpoint has already said what is missing
    own = model.state_dict()
    wrong = [k for k, v in own.items() if k not in state or tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if not wrong:
        return
    stored = checkpoint.get("recipe") if isinstance(checkpoint.get("recipe"), dict) else {}
    k = wrong[0]
    got = tuple(state[k].shape) if k in state and hasattr(state[k], "shape") else "absent"
    raise CheckpointError(
        f"--resume: {str(path)!r} was written for another model (recipe {stored.get('name', 'unknown')!r}, "
        f"{len(wrong)} of {len(own)} tensors differ, e.g. {k}: {got} in the file, {tuple(own[k].shape)} here) and "
        f"cannot continue {recipe_name!r}; give another --output, or the recipe and flags of that run")
