"""scikit-learn's handwritten digits as a tiny built-in image classification set.

Why: it ships inside scikit-learn (no download), so ``elsa train`` with no data argument and the tests can train a
real model end to end in minutes on a laptop CPU. The 1797 8x8 grey images (values 0..16) are scaled to 0..255,
upsampled to 32x32 and given three identical channels, so they fit ``elsa_swin_pico`` (32x32 RGB input).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .folder import apply_transform

DIGITS_NAME = "digits"
DIGITS_CLASSES = tuple(str(i) for i in range(10))
DIGITS_SIZE = 32
DIGITS_VAL_SIZE = 300
DIGITS_SPLIT_SEED = 0  # the train/val split is fixed (independent of --seed) so results are comparable


@functools.lru_cache(maxsize=4)
def _digits_arrays(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, size, size) images and int64 (N,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency of the digits set only
        raise ImportError("the built-in digits data set needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (N, 8, 8)
    up = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey])
    return up, digits.target.astype(np.int64)


def digits_split_indices(split: str, val_size: int = DIGITS_VAL_SIZE, seed: int = DIGITS_SPLIT_SEED) -> np.ndarray:
    """Indices of ``split`` ('train' or 'val') in a fixed stratified split: ``val_size`` images for validation
    (30 per class by default), the rest (1497) for training."""
    _, labels = _digits_arrays(DIGITS_SIZE)
    if split not in ("train", "val", "validation"):
        raise ValueError(f"split must be 'train' or 'val' for the digits data set, got {split!r}")
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    per_class = val_size // len(classes)
    val = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        val.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(val_mask if split != "train" else ~val_mask)


def load_digits_split(split: str, size: int = DIGITS_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, size, size) and labels int64 (N,) of the digits ``split`` ('train': 1497, 'val': 300)."""
    images, labels = _digits_arrays(size)
    idx = digits_split_indices(split)
    return images[idx], labels[idx]


class DigitsDataset(torch.utils.data.Dataset):
    """The digits split as a map-style data set of (PIL RGB image, label), like an ImageFolder.

    ``transform`` is applied to the PIL image (e.g. timm's eval transform), ``subset`` keeps the first n samples
    (for quick tests).
    """

    classes = list(DIGITS_CLASSES)

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, size: int = DIGITS_SIZE,
                 subset: Optional[int] = None) -> None:
        self.split = split
        self.images, self.targets = load_digits_split(split, size)
        if subset is not None:
            self.images, self.targets = self.images[:subset], self.targets[:subset]
        self.transform = transform
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = apply_transform(self.transform, img)
        return img, int(self.targets[index])


def digits_train_transform(size: int = DIGITS_SIZE, shift: int = 3, mean: Tuple[float, ...] = (0.5, 0.5, 0.5),
                           std: Tuple[float, ...] = (0.5, 0.5, 0.5), no_aug: bool = False) -> Callable:
    """Light augmentation that suits digits: random shift by up to ``shift`` pixels (pad + random crop). No flips
    (a flipped 2 is no 2), no mixup. ``no_aug`` gives the deterministic eval transform."""
    from torchvision import transforms as T

    ops = [] if size == DIGITS_SIZE else [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if not no_aug and shift > 0:
        ops.append(T.RandomCrop(size, padding=max(1, shift * size // DIGITS_SIZE), fill=0))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
