"""Data set and transform factories shared by ``elsa train``, ``elsa validate`` and ``elsa predict``.

Why one place: the train and eval pipelines must agree on class order, input size, crop ratio, interpolation and
normalisation; these functions resolve them from the model's pretrained config (timm's ``resolve_data_config``)
and build everything else with timm's transforms.

``name_or_root`` may be
- ``"digits"``: the built-in scikit-learn digits (train 1497 / val 300 images, 32x32 RGB, 10 classes);
- a folder ROOT with ROOT/train/CLASS/*.jpeg and ROOT/val/CLASS/*.jpeg (``validation`` is accepted for ``val``);
- a timm data set spec such as ``torch/cifar10`` (passed to ``timm.data.create_dataset``, files under ``data_dir``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .digits import DIGITS_NAME, DigitsDataset, digits_train_transform
from .folder import DatasetError, ImageFolderDataset

_logger = logging.getLogger(__name__)

_TIMM_PREFIXES = ("torch/", "tfds/", "hfds/", "hfids/", "wds/")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation")}


def is_digits(name_or_root: Optional[str]) -> bool:
    """True for the built-in digits set (also when no data is given at all)."""
    return name_or_root is None or str(name_or_root) == DIGITS_NAME


def is_timm_spec(name_or_root: str) -> bool:
    """True for a timm data set name such as ``torch/cifar10`` that is not an existing local path."""
    return str(name_or_root).startswith(_TIMM_PREFIXES) and not os.path.exists(name_or_root)


def _normalize_split(split: str) -> str:
    if split in ("val", "validation", "eval"):
        return "val"
    if split == "train":
        return "train"
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def split_folder(root: Union[str, os.PathLike], split: str) -> Path:
    """ROOT/train or ROOT/val (or ROOT/validation); a clear ``DatasetError`` naming what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist (expected DATA/train/CLASS/*.jpeg and "
                           f"DATA/val/CLASS/*.jpeg, 'digits', or a timm spec such as torch/cifar10)")
    names = _SPLIT_DIRS[_normalize_split(split)]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"data folder {str(root)!r} has no {' or '.join(repr(n) for n in names)} sub-folder "
                       f"(expected DATA/train/CLASS/*.jpeg and DATA/val/CLASS/*.jpeg)")


def create_dataset(name_or_root: Optional[str], split: str, transform: Optional[Callable] = None,
                   classes: Optional[Sequence[str]] = None, data_dir: Optional[str] = None,
                   download: bool = False, subset: Optional[int] = None):
    """The ``split`` ('train' or 'val') of a data set, as a map-style set of (image, class index).

    ``classes``: the training classes; a folder val set whose class folders differ raises ``DatasetError``.
    ``subset``: keep only the first n samples (digits and folders; for quick runs and tests).
    The result has a ``classes`` list (class names, index order) where the source provides one.
    """
    split = _normalize_split(split)
    if is_digits(name_or_root):
        return DigitsDataset(split, transform=transform, subset=subset)
    name_or_root = str(name_or_root)
    if is_timm_spec(name_or_root):
        from timm.data import create_dataset as timm_create_dataset

        try:
            ds = timm_create_dataset(name_or_root, root=data_dir or "data", split="train" if split == "train"
                                     else "validation", is_training=split == "train", download=download)
        except (RuntimeError, OSError, ImportError) as err:
            raise DatasetError(f"timm data set {name_or_root!r} (root {data_dir or 'data'!r}, split {split!r}) "
                               f"could not be opened: {err} (pass --data-dir, or --dataset-download to fetch it)"
                               ) from err
        ds.transform = transform
        if not hasattr(ds, "classes") and hasattr(getattr(ds, "reader", None), "class_to_idx"):
            ds.classes = list(ds.reader.class_to_idx)
        return ds
    ds = ImageFolderDataset(split_folder(name_or_root, split), transform=transform, classes=classes)
    if subset is not None:
        ds.samples = ds.samples[:subset]
        ds.targets = ds.targets[:subset]
    return ds


def resolve_model_data_config(model_or_cfg: Union[nn.Module, Dict[str, Any]], img_size: Optional[int] = None,
                              crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
                              ) -> Dict[str, Any]:
    """timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of a model or pretrained cfg,
    with explicit overrides. ``img_size`` is the square input side."""
    from timm.data import resolve_data_config

    args: Dict[str, Any] = {}
    if img_size is not None:
        if int(img_size) <= 0:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        args["input_size"] = (3, int(img_size), int(img_size))
    if crop_pct is not None:
        if not 0 < float(crop_pct) <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        args["crop_pct"] = float(crop_pct)
    if interpolation:
        args["interpolation"] = interpolation
    if mean is not None:
        args["mean"] = tuple(mean)
    if std is not None:
        args["std"] = tuple(std)
    if isinstance(model_or_cfg, nn.Module):
        return resolve_data_config(args, model=model_or_cfg)
    return resolve_data_config(args, pretrained_cfg=dict(model_or_cfg))


def build_eval_transform(model_or_cfg: Union[nn.Module, Dict[str, Any]], img_size: Optional[int] = None,
                         crop_pct: Optional[float] = None, interpolation: Optional[str] = None) -> Callable:
    """timm's evaluation transform (resize to img_size / crop_pct, centre crop, normalise) for a model.

    E.g. ELSA-Swin at 224: resize 248 bicubic, centre crop 224 (crop_pct 0.9). Digits with ``elsa_swin_pico``:
    32x32 in, unchanged, normalised with mean = std = 0.5.
    """
    from timm.data import create_transform

    cfg = resolve_model_data_config(model_or_cfg, img_size, crop_pct, interpolation)
    return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode"))


def build_train_transform(name_or_root: Optional[str], data_config: Dict[str, Any], no_aug: bool = False,
                          scale: Optional[Tuple[float, float]] = None, ratio: Optional[Tuple[float, float]] = None,
                          hflip: float = 0.5, vflip: float = 0.0, color_jitter: float = 0.4,
                          auto_augment: Optional[str] = None, interpolation: str = "random",
                          re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1,
                          digits_shift: int = 3) -> Callable:
    """The training transform: timm's (random resized crop, flip, RandAugment, random erasing, normalise) for
    image folders; a light random shift for the digits (no flips). ``no_aug``: resize/crop/normalise only."""
    if is_digits(name_or_root):
        return digits_train_transform(size=data_config["input_size"][-1], shift=digits_shift,
                                      mean=data_config["mean"], std=data_config["std"], no_aug=no_aug)
    from timm.data import create_transform

    if no_aug:
        return create_transform(data_config["input_size"], is_training=False,
                                interpolation=data_config["interpolation"], mean=data_config["mean"],
                                std=data_config["std"], crop_pct=data_config["crop_pct"])
    return create_transform(data_config["input_size"], is_training=True, scale=scale, ratio=ratio, hflip=hflip,
                            vflip=vflip, color_jitter=color_jitter, auto_augment=auto_augment or None,
                            interpolation=interpolation or data_config["interpolation"], mean=data_config["mean"],
                            std=data_config["std"], re_prob=re_prob, re_mode=re_mode, re_count=re_count)
