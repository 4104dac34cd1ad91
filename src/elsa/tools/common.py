"""Shared pieces of the inference tools: building a model from a checkpoint, the device, images, class names."""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config

from ..checkpoint import CheckpointError, has_ema, load_checkpoint, read_checkpoint, unwrap_state_dict
from ..engine import Runtime, amp_dtype, resolve_device
from ..data.image import open_rgb

_logger = logging.getLogger(__name__)


PathLike = Union[str, os.PathLike]


class ToolError(ValueError):
    """Bad input to a tool (a missing file, an argument out of range); the message names the argument."""


def _classifier_rows(model_name: str, state_dict: dict) -> Optional[int]:
    cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = (cfg.classifier if cfg is not None else None) or "head"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def infer_num_classes(model_name: str, checkpoint: PathLike, use_ema: bool = False) -> Optional[int]:
    """Classes of the checkpoint's classifier (rows of ``<classifier>.weight``), so official 1000-class files and
    our small-data checkpoints both load without ``--num-classes``; None when the file has no such tensor."""
    return _classifier_rows(model_name, unwrap_state_dict(read_checkpoint(checkpoint, "--checkpoint file"), use_ema=use_ema))


@dataclass
class CheckpointInfo:
    """What an ``elsa train`` file says about its model (None where it does not say; official files say nothing):
    the architecture, the classifier size, the class names and the data config (input size, crop, interpolation,
    mean/std) the model was trained and evaluated with. The tools take these as their defaults."""
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    classes: Optional[List[str]] = None
    data_config: Optional[Dict[str, Any]] = None


def _info_from(values: Dict[str, Any]) -> CheckpointInfo:
    def parsed(value):
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return None
        return value

    classes = parsed(values.get("classes"))
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        classes = None
    data_config = parsed(values.get("data_config"))
    if not (isinstance(data_config, dict) and isinstance(data_config.get("input_size"), (list, tuple))):
        data_config = None
    num_classes = values.get("num_classes")
    try:
        num_classes = int(num_classes) if num_classes is not None else None
    except (TypeError, ValueError):
        num_classes = None
    arch = values.get("arch") if isinstance(values.get("arch"), str) else None
    return CheckpointInfo(arch, num_classes, classes, data_config)


@functools.lru_cache(maxsize=1)
def _read(path: str, mtime_ns: int, size: int) -> Tuple[Any, CheckpointInfo]:
    raw = read_checkpoint(path, "--checkpoint file")
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            info = _info_from(f.metadata() or {})
    else:
        info = _info_from(raw) if isinstance(raw, dict) else CheckpointInfo()
    return raw, info


def read_checkpoint_once(checkpoint: PathLike) -> Tuple[Any, CheckpointInfo]:
    """(content, CheckpointInfo) of a checkpoint file, read once per command (the model, the class names and
    the data config all come from the same read)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ToolError(f"--checkpoint: file {str(path)!r} does not exist")
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def checkpoint_info(checkpoint: PathLike) -> CheckpointInfo:
    """The CheckpointInfo of a checkpoint file (see there)."""
    return read_checkpoint_once(checkpoint)[1]


def create_model_from_checkpoint(
    model_name: str,
    checkpoint: Optional[PathLike],
    num_classes: Optional[int] = None,
    use_ema: bool = False,
    device: Union[str, torch.device] = "cpu",
    **model_kwargs,
) -> nn.Module:
    """A timm model in eval mode with the weights of ``checkpoint`` (official ``.pth``, training checkpoint with
    ``state_dict``/``state_dict_ema``, or ``.safetensors``); ``num_classes`` is read from the file when None.

    ``use_ema`` on a file without EMA weights falls back to its regular weights (``load_checkpoint`` warns), as
    timm's validate does."""
    if not timm.models.is_model(model_name):
        raise ToolError(f"--model: unknown model {model_name!r} (see `elsa models` or timm.list_models())")
    raw, info = read_checkpoint_once(checkpoint) if checkpoint is not None else (None, CheckpointInfo())
    if info.arch is not None and info.arch != model_name:
        raise ToolError(f"--model {model_name!r} does not match --checkpoint {str(checkpoint)!r}, which was "
                        f"trained as {info.arch!r}: pass --model {info.arch}")
    if raw is not None and num_classes is None:
        # Without EMA weights, load_checkpoint falls back to the regular ones (and warns once, there).
        num_classes = _classifier_rows(model_name, unwrap_state_dict(raw, use_ema=use_ema and has_ema(raw)))
        if num_classes is not None:
            _logger.info("num_classes=%d, from the checkpoint's classifier", num_classes)
    if num_classes is not None:
        if num_classes < 0:
            raise ToolError(f"--num-classes must be >= 0, got {num_classes}")
        model_kwargs["num_classes"] = num_classes
    model = timm.create_model(model_name, **model_kwargs)
    if raw is not None:
        load_checkpoint(model, raw, use_ema=use_ema)
    else:
        _logger.warning("no checkpoint given: %s has random weights", model_name)
    return model.to(device).eval()


def eval_transform(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                   interpolation: Optional[str] = None, stored: Optional[Dict[str, Any]] = None):
    """(data config, transform) for inference: the data config the checkpoint stores (``stored``: what the model
    was trained and evaluated with), else the model's pretrained_cfg (mean/std, crop_pct, interpolation, input
    size); whatever of ``img_size``/``crop_pct``/``interpolation`` is given overrides it, and the log says so."""
    if img_size is not None and img_size < 1:
        raise ToolError(f"--img-size must be a positive number of pixels, got {img_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ToolError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    if interpolation:
        from timm.data.transforms import str_to_interp_mode

        try:
            str_to_interp_mode(interpolation)
        except KeyError:
            raise ToolError(f"--interpolation {interpolation!r} is not a resize interpolation timm knows (e.g. "
                            f"bilinear, bicubic, nearest, lanczos)") from None
    args = {}
    if img_size is not None:
        args["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    if interpolation:
        args["interpolation"] = interpolation
    if stored:
        cfg = resolve_data_config(args, pretrained_cfg=dict(stored))
        for key, flag in (("input_size", "--img-size"), ("crop_pct", "--crop-pct"), ("interpolation",
                                                                                     "--interpolation")):
            if key in args and tuple(np_list(stored.get(key))) != tuple(np_list(cfg[key])):
                _logger.warning("%s: using %s %s instead of the checkpoint's %s (what the model was trained with)",
                                flag, key, cfg[key], stored.get(key))
    else:
        cfg = resolve_data_config(args, model=model)
    try:
        transform = create_transform(**cfg, is_training=False)
    except (KeyError, ValueError, AssertionError) as err:
        raise ToolError(f"--img-size / --crop-pct / --interpolation: {err}") from err
    return cfg, transform


def np_list(value: Any) -> list:
    """A value as a list (scalars as one item), to compare config values of different container types."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_classes(info: CheckpointInfo, num_classes: int, class_names_file: Optional[PathLike] = None
                    ) -> Optional[list[str]]:
    """Names of the model's outputs: --class-names FILE when given, else those the checkpoint stores, else
    ImageNet-1k's for a 1000-class head, else None (indices)."""
    if class_names_file is None and info.classes is not None:
        if len(info.classes) == num_classes:
            return list(info.classes)
        _logger.warning("the checkpoint names %d classes but its classifier has %d outputs: showing indices",
                        len(info.classes), num_classes)
    return class_names(num_classes, class_names_file)


def checkpoint_classes(checkpoint: PathLike, num_classes: int) -> Optional[list[str]]:
    """The class names an ``elsa train`` checkpoint (or its model.safetensors) stores, when there are
    ``num_classes`` of them; None for files without them (official files)."""
    classes = checkpoint_info(checkpoint).classes
    return list(classes) if classes is not None and len(classes) == num_classes else None


def load_image(path: PathLike) -> Image.Image:
    """An RGB PIL image, or a ToolError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"image {str(path)!r} does not exist")
    try:
        return open_rgb(path)
    except (UnidentifiedImageError, OSError) as err:
        raise ToolError(f"image {str(path)!r} cannot be read as an image: {err}") from err


def class_names(num_classes: int, class_names_file: Optional[PathLike] = None) -> Optional[list[str]]:
    """Names for the classifier's outputs: from ``class_names_file`` (one per line, or a JSON list), else the
    ImageNet-1k names timm ships when there are 1000 classes, else None (callers show indices)."""
    if class_names_file is not None:
        path = Path(class_names_file)
        if not path.is_file():
            raise ToolError(f"--class-names: file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            names = json.loads(text)
            if not isinstance(names, list):
                raise ToolError(f"--class-names: {path} must hold a JSON list of names, got {type(names).__name__}")
            names = [str(n) for n in names]
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ToolError(f"--class-names: {path} has {len(names)} names but the model has {num_classes} classes")
        return names
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        return [info.index_to_description(i) for i in range(1000)]
    return None


def Autocast(enabled: bool, device: torch.device):  # noqa: N802 - used like the class it replaced
    """The autocast context factory for inference: the engine's policy with float16 on CUDA, bfloat16 on CPU (the
    dtypes each has fast kernels for)."""
    dtype = amp_dtype(enabled, device, "float16" if device.type == "cuda" else "bfloat16")
    return Runtime(device=device, amp_dtype=dtype).autocast


def parse_ints(text: str, name: str, count: Optional[int] = None) -> Sequence[int]:
    """'3,4' -> (3, 4); a ToolError naming ``name`` for anything else."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ToolError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise ToolError(f"{name}: expected {count} comma-separated integers, got {text!r}")
    return values


__all__ = ["Autocast", "CheckpointError", "CheckpointInfo", "ToolError", "checkpoint_classes", "checkpoint_info",
           "class_names", "read_checkpoint_once", "resolve_classes",
           "create_model_from_checkpoint",
           "eval_transform", "infer_num_classes", "load_image", "parse_ints", "resolve_device"]
