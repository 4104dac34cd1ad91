"""Test fixture: a small synthetic dataset in the ADE20K layout (no download).

Each image is a textured grey background (class 1) with a few coloured shapes: red rectangles (class 2), green discs
(class 3), blue triangles (class 4). Hues are 120 degrees apart, far more than the +-36 degree hue jitter of the training
pipeline, and low-saturation grey stays grey, so colour and shape both identify a class. A thin stripe of random
colour is labelled 0 ("other"), which the ADE20K convention ignores (reduce_zero_label) — it exercises the ignore
path. Written as ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/.../*.png.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from PIL import Image

# raw label -> base colour (class 0 "other" has a random colour per image)
COLOURS = {1: (128, 128, 128), 2: (220, 40, 40), 3: (40, 200, 40), 4: (40, 60, 220)}
NUM_CLASSES = 4  # after reduce_zero_label: background, rectangle, disc, triangle


def _draw_sample(rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    h, w = size
    label = np.ones((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(2, 5))
        s = int(rng.integers(min(h, w) // 5, min(h, w) // 2))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        if cls == 2:
            mask = (abs(yy - cy) <= s // 2) & (abs(xx - cx) <= int(s * rng.uniform(0.4, 0.9)))
        elif cls == 3:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (s // 2) ** 2
        else:  # upward triangle with apex at (cy - s/2, cx)
            dy = yy - (cy - s // 2)
            mask = (dy >= 0) & (dy <= s) & (abs(xx - cx) <= dy * 0.6)
        label[mask] = cls
    if rng.random() < 0.7:  # an "other" stripe (label 0, ignored in training and evaluation)
        t = int(rng.integers(2, 5))
        if rng.random() < 0.5:
            y = int(rng.integers(0, h - t))
            label[y:y + t, :] = 0
        else:
            x = int(rng.integers(0, w - t))
            label[:, x:x + t] = 0
    img = np.zeros((h, w, 3), np.float32)
    for cls, colour in COLOURS.items():
        img[label == cls] = colour
    img[label == 0] = rng.integers(0, 256, 3)
    img += rng.normal(0.0, 12.0, img.shape)  # texture, so colour is not a single value
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_synthetic_ade(root: Union[str, os.PathLike], num_train: int = 64, num_val: int = 16,
                       size: Tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Write the dataset under ``root`` and return ``root/ADEChallengeData2016``. Image sizes vary per image between
    ``size[0]`` and ``size[1]`` on each side (ADE images vary too)."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {num_train} and {num_val}")
    lo, hi = size
    if not 8 <= lo <= hi:
        raise ValueError(f"size must be (min, max) with 8 <= min <= max, got {size}")
    rng = np.random.default_rng(seed)
    ade = Path(root) / "ADEChallengeData2016"
    for split, n in (("training", num_train), ("validation", num_val)):
        img_dir, ann_dir = ade / "images" / split, ade / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            hw = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
            img, label = _draw_sample(rng, hw)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(img_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(label, mode="L").save(ann_dir / f"{stem}.png")
    return ade
