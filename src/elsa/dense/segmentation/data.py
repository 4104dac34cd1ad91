"""ADE20K data: the directory layout, the official training pipeline, and a skip-and-count policy for bad files.

Layout (the official ``ADEChallengeData2016`` release)::

    ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png   (uint8, 0 = "other", 1..150 = classes)

``ROOT`` may also be the ``ADEChallengeData2016`` folder itself. Labels are reduced as mmseg's ``reduce_zero_label``:
0 -> 255 (ignored), k -> k - 1.

Training pipeline (official ``_base_/datasets/ade20k.py``, mmseg 0.x semantics): keep-ratio resize to
``img_scale * r``, r ~ U(0.5, 2.0); random crop with ``cat_max_ratio`` 0.75 (up to 10 tries); horizontal flip 0.5;
PhotoMetricDistortion; normalise (ImageNet mean/std, RGB); pad bottom/right to the crop size (image 0, label 255).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ...data.image import open_rgb
from .segmentor import IGNORE_INDEX, rescale_size

_logger = logging.getLogger(__name__)

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("training", "validation")


# ------------------------------------------------------------------------------------------------------------ layout
def resolve_ade_root(root: Union[str, os.PathLike]) -> Path:
    """The ``ADEChallengeData2016`` folder from ROOT or ROOT/ADEChallengeData2016; a clear error otherwise."""
    root = Path(root)
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise FileNotFoundError(
        f"--data: {root} is not an ADE20K root; expected {root}/ADEChallengeData2016/images|annotations/"
        f"training|validation (or {root}/images|annotations/...)")


@dataclass
class Skipped:
    path: str
    reason: str


def scan_split(ade_dir: Path, split: str) -> Tuple[List[Tuple[Path, Path]], List[Skipped]]:
    """Pairs (image, annotation) of a split, sorted by name; images without an annotation are skipped and returned."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    img_dir, ann_dir = ade_dir / "images" / split, ade_dir / "annotations" / split
    if not img_dir.is_dir():
        raise FileNotFoundError(f"ADE20K split {split!r}: no image folder {img_dir}")
    pairs, skipped = [], []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        ann = ann_dir / (img.stem + ".png")
        if ann.is_file():
            pairs.append((img, ann))
        else:
            skipped.append(Skipped(str(img), f"no annotation {ann.name}"))
    if skipped:
        _logger.warning("ADE20K %s: skipped %d image(s) without annotation (first: %s)", split, len(skipped),
                        skipped[0].path)
    return pairs, skipped


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """uint8 ADE label map -> 0 becomes 255 (ignored), k becomes k - 1 (255 stays ignored)."""
    label = label.astype(np.int16)
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[label == 255] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_pair(img_path: Path, ann_path: Optional[Path]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(H, W, 3) uint8 RGB image and the (H, W) uint8 raw annotation; raises OSError/ValueError on bad files."""
    img = np.asarray(open_rgb(img_path))
    label = None
    if ann_path is not None:
        with Image.open(ann_path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"annotation {ann_path} has mode {im.mode}, expected a single-channel label map")
            label = np.asarray(im).astype(np.int64)
        if label.max(initial=0) > 255:
            raise ValueError(f"annotation {ann_path} has labels above 255")
        label = label.astype(np.uint8)
        if label.shape != img.shape[:2]:
            raise ValueError(f"annotation {ann_path} is {label.shape}, image is {img.shape[:2]}")
    return img, label


def check_labels(raw: np.ndarray, reduced: np.ndarray, num_classes: int, ann_path: Path) -> None:
    """ValueError naming ``ann_path`` if a reduced label is neither a class (< num_classes) nor ignored."""
    bad = (reduced != IGNORE_INDEX) & (reduced >= num_classes)
    if bad.any():
        values = np.unique(raw[bad])
        raise ValueError(f"annotation {ann_path} has labels {values[:5].tolist()} ({int(bad.sum())} pixels) outside "
                         f"1..{num_classes} (0 and 255 mean ignore; the model has {num_classes} classes)")


# -------------------------------------------------------------------------------------------------------- transforms
def resize_image(img: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialias, as OpenCV's INTER_LINEAR used by mmcv), uint8 -> uint8."""
    if tuple(img.shape[:2]) == tuple(size_hw):
        return img
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size_hw, mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (floor of the scaled coordinate, as OpenCV's INTER_NEAREST)."""
    if tuple(label.shape) == tuple(size_hw):
        return label
    t = torch.from_numpy(np.array(label, copy=True))[None, None].float()
    return F.interpolate(t, size=size_hw, mode="nearest")[0, 0].to(torch.uint8).numpy()


def random_crop_box(label: np.ndarray, crop: Tuple[int, int], cat_max_ratio: float,
                    rng: random.Random) -> Tuple[int, int, int, int]:
    """(y1, y2, x1, x2): a random crop; with cat_max_ratio < 1 retried (up to 10 times) until no single class
    covers more than that share of the crop's labelled pixels and at least two classes appear (mmseg RandomCrop)."""
    h, w = label.shape

    def draw():
        y = rng.randint(0, max(h - crop[0], 0))
        x = rng.randint(0, max(w - crop[1], 0))
        return y, y + crop[0], x, x + crop[1]

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def rgb_to_hsv_cv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV with OpenCV's 8-bit convention (H in [0, 180), S and V in [0, 255])."""
    x = img.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    mn = x.min(-1)
    d = v - mn
    s = np.where(v > 0, d / np.maximum(v, 1e-12), 0.0)
    dd = np.where(d > 0, d, 1.0)
    h = np.where(v == r, (g - b) / dd, np.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd)) * 60.0
    h = np.where(d > 0, h, 0.0) % 360.0
    out = np.stack([np.round(h / 2.0) % 180, np.round(s * 255), np.round(v * 255)], -1)
    return out.astype(np.uint8)


def hsv_cv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv_cv`."""
    h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32) / 255.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(hsv.shape, np.float32)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        rgb[..., 0][m], rgb[..., 1][m], rgb[..., 2][m] = r[m], g[m], b[m]
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: random.Random, brightness_delta: int = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: each step with probability 0.5 — brightness +U(-32, 32),
    contrast xU(0.5, 1.5) (before or after the colour steps, at random), saturation xU(0.5, 1.5), hue shift by an
    integer in [-18, 18) on OpenCV's 180-step hue circle; values clipped to [0, 255] after each step."""

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.randrange(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.randrange(2) == 1
    if contrast_first and rng.randrange(2):
        img = convert(img, alpha=rng.uniform(*contrast_range))
    if rng.randrange(2):
        hsv = rgb_to_hsv_cv(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_cv_to_rgb(hsv)
    if rng.randrange(2):
        hsv = rgb_to_hsv_cv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randrange(-hue_delta, hue_delta)) % 180
        img = hsv_cv_to_rgb(hsv)
    if not contrast_first and rng.randrange(2):
        img = convert(img, alpha=rng.uniform(*contrast_range))
    return img


def normalize(img: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised."""
    t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class TrainTransform:
    """The official training pipeline (see the module docstring). __call__(img uint8 RGB, reduced label) ->
    (img (3, crop_h, crop_w) float, label (crop_h, crop_w) long)."""

    def __init__(self, img_scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0),
                 crop_size: Tuple[int, int] = (512, 512), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, seed: Optional[int] = None) -> None:
        self.img_scale, self.ratio_range, self.crop_size = tuple(img_scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, img: np.ndarray, label: np.ndarray) -> Tuple[Tensor, Tensor]:
        rng = self.rng
        r = rng.uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
        size = rescale_size(img.shape[:2], scale)
        img, label = resize_image(img, size), resize_label(label, size)
        y1, y2, x1, x2 = random_crop_box(label, self.crop_size, self.cat_max_ratio, rng)
        img, label = img[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        x = normalize(img)
        y = torch.from_numpy(np.ascontiguousarray(label)).long()
        ph, pw = self.crop_size[0] - x.shape[1], self.crop_size[1] - x.shape[2]
        if ph > 0 or pw > 0:
            x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            y = F.pad(y, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        return x, y


# ----------------------------------------------------------------------------------------------------------- dataset
class ADE20KDataset(torch.utils.data.Dataset):
    """ADE20K split. Items: dict(img, label, path) — with ``transform`` the transformed training pair; without, the
    normalised full-size image (3, H, W) and the reduced label (H, W) for evaluation. An unreadable image or
    annotation raises (OSError/ValueError): training wraps the set in ``elsa.data.SkipUnreadable`` (replaced, warned
    once, counted), evaluation skips and counts it. Images without an annotation are left out at scan time and
    listed in ``skipped``. With ``num_classes`` K, an annotation holding a raw label above K (other than 255) raises
    a ValueError naming the file: mmseg's ``reduce_zero_label`` does not map such labels to "ignore" (it crashes in
    the loss and leaves them out of the metrics unsaid), so neither training nor evaluation may use it."""

    def __init__(self, root: Union[str, os.PathLike], split: str = "training",
                 transform: Optional[TrainTransform] = None, num_classes: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.ade_dir = resolve_ade_root(root)
        self.split = split
        self.pairs, self.skipped = scan_split(self.ade_dir, split)
        if not self.pairs:
            raise FileNotFoundError(f"ADE20K split {split!r} under {self.ade_dir} has no image with an annotation")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def filename(self, index: int) -> str:
        return str(self.pairs[index][0])

    def __getitem__(self, index: int) -> Dict[str, object]:
        img_path, ann_path = self.pairs[index]
        img, raw = load_pair(img_path, ann_path)
        label = reduce_zero_label(raw)
        if self.num_classes is not None:
            check_labels(raw, label, self.num_classes, ann_path)
        if self.transform is not None:
            x, y = self.transform(img, label)
        else:
            x, y = normalize(img), torch.from_numpy(label).long()
        return {"img": x, "label": y, "path": str(img_path)}


def collate_skip(batch: List[Dict[str, object]]) -> Dict[str, object]:
    """Stack the samples of ``SkipUnreadable(ADE20KDataset)``; ``skipped`` sums the unreadable files met."""
    good = [b for b in batch if b is not None]
    out: Dict[str, object] = {"skipped": sum(int(b.get("skipped", 0)) for b in good) + len(batch) - len(good),
                              "path": [b["path"] for b in good]}
    if good:
        out["img"] = torch.stack([b["img"] for b in good])  # type: ignore[misc]
        out["label"] = torch.stack([b["label"] for b in good])  # type: ignore[misc]
    return out
