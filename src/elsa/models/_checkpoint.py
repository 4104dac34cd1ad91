"""Reading official and our own checkpoint files, safely, with errors that say what is wrong."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

# Where timm-style training checkpoints keep the weights, in order of preference (EMA first when asked for).
_NESTED_KEYS = ("state_dict", "model", "module")
_EMA_KEYS = ("state_dict_ema", "model_ema")


# The only non-tensor, non-container type official files hold: timm 0.4's CheckpointSaver (the official train.py)
# stores the run's argparse.Namespace under 'args' (a bag of str/int/float/bool/None/list values). Everything else in
# official files is plain data that weights_only=True reads as is: the optimizer state, timm's EMA weights, the native
# ('amp_scaler') or apex ('amp') loss-scaler state, and mmdet/mmseg's 'meta' (config text, CLASSES, PALETTE, env info,
# mmcv version, epoch/iter, hook messages). Nothing that can run code is allowed.
SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: keys the model lacked in the file, and keys of the file the model ignored."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Load a ``.safetensors`` file or a PyTorch pickle with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a valid .safetensors file (truncated or another format): {err}") from err
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign bytes (IndexError, KeyError, ...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupt, or holding objects other than "
            f"tensors, which weights_only=True refuses): {err}") from err


def unwrap_state_dict(checkpoint: dict, use_ema: bool = False) -> dict:
    """The weights of a training checkpoint: top level, or under state_dict/model (state_dict_ema with
    ``use_ema``), with any DataParallel/DDP ``module.`` prefix removed."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    if use_ema and not any(isinstance(checkpoint.get(k), dict) for k in _EMA_KEYS):
        # As timm does: fall back to the regular weights, but say so (only ELSA-Swin-B was released with EMA).
        _logger.warning("use_ema=True but the checkpoint has none of %s; using its regular weights", list(_EMA_KEYS))
    keys = (_EMA_KEYS + _NESTED_KEYS) if use_ema else _NESTED_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. an epoch counter beside the weights
        state_dict[k[len("module."):] if k.startswith("module.") else k] = v
    if not state_dict:
        raise CheckpointError("the checkpoint holds no tensors")
    return state_dict


def _name_some(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> LoadReport:
    """Load ``state_dict`` into ``model`` after checking names and shapes; raise with the details if ``strict``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"shape mismatch for {k}: checkpoint has {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_name_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_name_some(unexpected)})")
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return LoadReport(missing, unexpected)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], use_ema: bool = False,
                    strict: bool = True) -> LoadReport:
    """Load an official ``.pth`` or a ``.safetensors`` file into ``model``.

    The file's weights may sit at the top level or under ``state_dict``/``model`` (``state_dict_ema`` with
    ``use_ema``), with an optional ``module.`` prefix. Model-specific remapping (the model module's
    ``checkpoint_filter_fn``) is applied when the model's family defines one.
    """
    state_dict = unwrap_state_dict(read_state_dict(path), use_ema=use_ema)
    filter_fn = getattr(__import__(type(model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    report = fit_state_dict(model, state_dict, strict=strict)
    _logger.info("loaded %s (%d tensors, %d missing, %d unexpected)", path, len(state_dict),
                 len(report.missing), len(report.unexpected))
    return report
