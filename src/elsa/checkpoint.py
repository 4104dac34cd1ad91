"""The one reader and writer of checkpoint files: model weights (official, timm-style, ours, ``.safetensors``) and
training checkpoints (``elsa train``, ``elsa det train``, ``elsa seg train``).

Rules, the same for every command:
- reading: ``torch.load(weights_only=True)`` always (a checkpoint is a file people share), each file read once;
  an unreadable, truncated or foreign file raises ``CheckpointError`` saying which and why;
- writing: atomic (temporary file, fsync, rename), so a crash or SIGKILL leaves the previous complete file;
- key names: ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped (timm's
  ``clean_state_dict``); weights sit at the top level or under ``state_dict``/``model``/``module``, EMA weights
  under ``state_dict_ema``/``model_ema``;
- strictness: every tensor of the model must be in the file and every tensor of the file must be used, with a
  shape check, unless the caller names its exceptions (``strict=False`` for backbone initialisation, ``ignore``
  for keys a model rebuilds itself, such as Swin's ``attn_mask`` buffers);
- a model family's remapping of foreign files (``checkpoint_filter_fn``) is registered explicitly with
  ``register_filter`` by ``elsa.models``, not found by importing the model's module.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Union

import torch
import torch.nn as nn

from .io import torch_save

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Where timm-style training checkpoints keep the weights, in order of preference (EMA first when asked for).
NESTED_KEYS = ("state_dict", "model", "module")
EMA_KEYS = ("state_dict_ema", "model_ema")
TRAIN_CHECKPOINT_VERSION = 2
# Names of training checkpoints written before the shared engine (version 1 of `elsa train`) -> today's names.
_LEGACY_TRAIN_KEYS = {"state_dict": "model", "state_dict_ema": "model_ema", "global_step": "iteration"}


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file cannot be read or does not fit the model: bad input (a ValueError, reported by the CLI as
    a user error), and a RuntimeError as it has always been."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a FileNotFoundError, so callers may catch either)."""


@dataclass
class LoadReport:
    """What a load did: keys the model lacked in the file, and keys of the file the model ignored."""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------ reading
# The only non-tensor, non-container type official files hold: timm 0.4's CheckpointSaver (the official train.py)
# stores the run's argparse.Namespace under 'args' (a bag of str/int/float/bool/None/list values). Everything else in
# official files is plain data that weights_only=True reads as is: the optimizer state, timm's EMA weights, the native
# ('amp_scaler') or apex ('amp') loss-scaler state, and mmdet/mmseg's 'meta' (config text, CLASSES, PALETTE, env info,
# mmcv version, epoch/iter, hook messages). Nothing that can run code is allowed.
SAFE_GLOBALS = (argparse.Namespace,)


def read_checkpoint(path: PathLike, what: str = "checkpoint file") -> Any:
    """The content of a ``.safetensors`` file or a PyTorch pickle (``weights_only=True``); ``what`` names the
    argument in errors (e.g. ``"--resume file"``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{what} {str(path)!r} is not a valid .safetensors file (truncated or another "
                                  f"format): {err}") from err
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes): not a checkpoint")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign bytes (IndexError, KeyError, ...)
        raise CheckpointError(f"{what} {str(path)!r} {_why_unreadable(path, err)}") from err


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _why_unreadable(path: Path, err: BaseException) -> str:
    """One clause saying why ``torch.load(weights_only=True)`` refused ``path``: truncated, not a PyTorch file, or
    holding objects that could run code. PyTorch's own advice to retry with ``weights_only=False`` is left out on
    purpose: that would execute whatever the file holds."""
    text = str(err)
    forbidden = _GLOBAL.search(text)
    if forbidden and "Unsupported operand" not in text:
        return (f"contains a disallowed object ({forbidden.group(1)}), which weights_only=True refuses: only "
                f"tensors and plain data are loaded from checkpoint files, so it was not read")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # a zip archive, the format of torch.save: its end (central directory) is missing
        return ("is not a readable PyTorch checkpoint: truncated or corrupt (a zip archive that cannot be read to "
                "the end)")
    if head[:1] == b"\x80" and isinstance(err, (EOFError, pickle.UnpicklingError)) and "operand" not in text:
        return "is not a readable PyTorch checkpoint: truncated (the pickle ends early)"
    return ("is not a readable PyTorch checkpoint: neither a torch.save file nor a .safetensors file (another "
            "format, or truncated)")


def read_state_dict(path: PathLike) -> dict:
    """Alias of ``read_checkpoint`` kept for the public API (``elsa.models.read_state_dict``)."""
    return read_checkpoint(path)


def clean_state_dict(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` with DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes removed
    (timm's ``clean_state_dict``); non-tensor entries (an epoch counter beside the weights) are dropped."""
    from timm.models import clean_state_dict as timm_clean

    return timm_clean({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})


def unwrap_state_dict(checkpoint: dict, use_ema: bool = False) -> dict:
    """The weights of a checkpoint: top level, or under state_dict/model/module (state_dict_ema/model_ema with
    ``use_ema``), cleaned of wrapper prefixes."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    if use_ema and not any(isinstance(checkpoint.get(k), dict) for k in EMA_KEYS):
        # As timm does: fall back to the regular weights, but say so (only ELSA-Swin-B was released with EMA).
        _logger.warning("use_ema=True but the checkpoint has none of %s; using its regular weights", list(EMA_KEYS))
    for key in (EMA_KEYS + NESTED_KEYS) if use_ema else NESTED_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = clean_state_dict(checkpoint)
    if not state_dict:
        raise CheckpointError("the checkpoint holds no tensors")
    return state_dict


def has_ema(checkpoint: Any) -> bool:
    """Whether a read checkpoint holds EMA weights."""
    return isinstance(checkpoint, dict) and any(isinstance(checkpoint.get(k), dict) for k in EMA_KEYS)


# ------------------------------------------------------------------------------------------------------------ fitting
_FILTERS: Dict[type, Callable[[dict, nn.Module], dict]] = {}


def register_filter(model_class: type, filter_fn: Callable[[dict, nn.Module], dict]) -> None:
    """Declare the family's ``checkpoint_filter_fn(state_dict, model)`` that remaps foreign files for
    ``model_class`` (exact class, so a subclass with other names, e.g. a detection backbone, is not remapped)."""
    _FILTERS[model_class] = filter_fn


def _name_some(keys: List[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, state_dict: dict, strict: bool = True,
                   ignore: Iterable[str] = ()) -> LoadReport:
    """Load ``state_dict`` into ``model`` after checking names and shapes (a shape mismatch always raises).

    ``strict``: missing or unexpected keys raise, except those ending with a suffix in ``ignore`` (buffers a
    model rebuilds, e.g. ``num_batches_tracked``, ``attn_mask``); ``strict=False`` only reports them."""
    ignore = tuple(ignore)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not (ignore and k.endswith(ignore))]
    unexpected = [k for k in state_dict if k not in own and not (ignore and k.endswith(ignore))]
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


def load_checkpoint(model: nn.Module, path: Union[PathLike, dict], use_ema: bool = False,
                    strict: bool = True) -> LoadReport:
    """Load an official ``.pth``, one of our training checkpoints or a ``.safetensors`` file into ``model``
    (``path`` may also be an already read checkpoint, so no file is read twice).

    The family's registered ``checkpoint_filter_fn`` remaps foreign layouts before the strict fit."""
    raw = path if isinstance(path, dict) else read_checkpoint(path)
    state_dict = unwrap_state_dict(raw, use_ema=use_ema)
    filter_fn = _FILTERS.get(type(model))
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    report = fit_state_dict(model, state_dict, strict=strict)
    _logger.info("loaded %s (%d tensors, %d missing, %d unexpected)", "checkpoint" if isinstance(path, dict)
                 else path, len(state_dict), len(report.missing), len(report.unexpected))
    return report


# ------------------------------------------------------------------------------------------------- training checkpoints
def save_training_checkpoint(checkpoint: Dict[str, Any], path: PathLike) -> Path:
    """Write a training checkpoint atomically (the old file stays intact until the new one is complete)."""
    return torch_save(dict(checkpoint, version=TRAIN_CHECKPOINT_VERSION), path)


def load_training_checkpoint(path: PathLike, what: str = "--resume file", command: str = "elsa train",
                             required: Iterable[str] = ("model", "optimizer", "epoch")) -> Dict[str, Any]:
    """A training checkpoint for resuming, with the names of earlier versions mapped to today's (``state_dict`` ->
    ``model``, ``state_dict_ema`` -> ``model_ema``, ``global_step`` -> ``iteration``)."""
    ckpt = read_checkpoint(path, what)
    if isinstance(ckpt, dict):
        ckpt = {_LEGACY_TRAIN_KEYS.get(k, k) if _LEGACY_TRAIN_KEYS.get(k, k) not in ckpt else k: v
                for k, v in ckpt.items()}
    missing = [k for k in required if k not in ckpt] if isinstance(ckpt, dict) else ["*"]
    if missing:
        raise CheckpointError(f"{what} {str(path)!r} is not an `{command}` checkpoint (no {missing}); to "
                              f"start from weights only, use --initial-checkpoint or --pretrained")
    return ckpt
