"""Test fixture: a small COCO-format instance-segmentation dataset of synthetic shapes (no download), and the tiny
detector recipes that learn it on a CPU.

Layout written (the same as COCO 2017, so ``elsa det`` reads it like the real thing)::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/000000000001.png ...
    ROOT/annotations/instances_val2017.json     ROOT/val2017/...

Each image (``min_size``..``max_size`` px a side) has 1..``max_objects`` filled shapes on a noisy background:
category 1 "box" (axis-aligned rectangles, reddish) and category 2 "disc" (ellipses drawn as 24-gons, bluish),
so class is learnable from both shape and colour. Shapes are drawn from their polygons, so each polygon mask is
exactly the painted pixels; later shapes may occlude earlier ones a little (as in real data).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from elsa.dense.detection.data import _polygon_area
from elsa.dense.recipes_det import DetRecipe
from elsa.io import atomic_write_text

CATEGORIES = [{"id": 1, "name": "box", "supercategory": "shape"},
              {"id": 2, "name": "disc", "supercategory": "shape"}]


def _shape(rng: np.random.Generator, cat: int, w: int, h: int) -> List[Tuple[float, float]]:
    side = min(w, h)
    sw = rng.uniform(0.2, 0.45) * side
    sh = rng.uniform(0.2, 0.45) * side
    cx = rng.uniform(sw / 2, w - sw / 2)
    cy = rng.uniform(sh / 2, h - sh / 2)
    if cat == 1:
        x0, y0, x1, y1 = cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    n = 24
    return [(cx + sw / 2 * math.cos(2 * math.pi * k / n), cy + sh / 2 * math.sin(2 * math.pi * k / n))
            for k in range(n)]


def make_image(rng: np.random.Generator, w: int, h: int, max_objects: int):
    """One image (H, W, 3) uint8 and its [(category_id, polygon points)]."""
    from PIL import Image, ImageDraw

    bg = rng.normal(110, 25, size=(h, w, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cat = int(rng.integers(1, 3))
        pts = _shape(rng, cat, w, h)
        base = np.array([200, 60, 50]) if cat == 1 else np.array([50, 80, 210])
        colour = tuple(int(c) for c in (base + rng.integers(-30, 31, size=3)).clip(0, 255))
        draw.polygon(pts, fill=colour)
        objects.append((cat, pts))
    return np.asarray(img), objects


def write_split(root: Union[str, os.PathLike], split: str, num_images: int, seed: int = 0, min_size: int = 64,
                max_size: int = 96, max_objects: int = 3) -> Path:
    """Write ``num_images`` images to ROOT/{split}2017 and ROOT/annotations/instances_{split}2017.json."""
    from PIL import Image

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    root = Path(root)
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    ann_id = 1
    for i in range(1, num_images + 1):
        w, h = int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))
        arr, objects = make_image(rng, w, h, max_objects)
        name = f"{i:012d}.png"
        Image.fromarray(arr).save(img_dir / name)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for cat, pts in objects:
            xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            annotations.append({
                "id": ann_id, "image_id": i, "category_id": cat, "iscrowd": 0,
                "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                "area": round(_polygon_area([v for p in pts for v in p]), 2),
                "segmentation": [[round(float(v), 2) for p in pts for v in p]],
            })
            ann_id += 1
    data = {"info": {"description": "elsa synthetic shapes"}, "images": images, "annotations": annotations,
            "categories": CATEGORIES}
    path = root / "annotations" / f"instances_{split}2017.json"
    atomic_write_text(path, json.dumps(data))
    return path


def make_synthetic_coco(root: Union[str, os.PathLike], num_train: int = 64, num_val: int = 16, seed: int = 0,
                        **kwargs) -> Dict[str, Path]:
    """Write train and val splits under ``root``; returns the two annotation paths."""
    return {"train": write_split(root, "train", num_train, seed=seed, **kwargs),
            "val": write_split(root, "val", num_val, seed=seed + 1, **kwargs)}


# Tiny detectors for these shapes: a 4-stage ELSA-Swin with 16 channels, small heads and 64..96 px images (CPU tests).
_TINY_BACKBONE = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), group_width=4, elsa_kernel=3,
                      window_size=4)
TINY_RECIPES = {"mask_rcnn_tiny_test": DetRecipe(
    name="mask_rcnn_tiny_test", backbone="elsa_swin_tiny", backbone_kwargs=_TINY_BACKBONE, drop_path_rate=0.0,
    num_classes=2, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
    rpn_batch_size_per_image=64, representation_size=128, box_batch_size_per_image=64, mask_head_channels=32,
    mask_head_convs=2, train_scales=(64, 72, 80, 88, 96), max_size=160, crop_prescales=(64, 80, 96),
    crop_size=(48, 96), detr_crop=False, test_size=(80, 160), lr=1e-3, weight_decay=0.05, epochs=12,
    warmup_iters=20, batch_size=4, workers=0, amp=False)}
TINY_RECIPES["cascade_mask_rcnn_tiny_test"] = TINY_RECIPES["mask_rcnn_tiny_test"].replace(
    name="cascade_mask_rcnn_tiny_test", arch="cascade_mask_rcnn", box_head="4conv1fc", rpn_post_nms_top_n_train=100,
    rpn_box_loss="smooth_l1", rpn_allowed_border=0)


def tiny_recipe(name: str = "mask_rcnn_tiny_test", **overrides) -> DetRecipe:
    """A tiny recipe with ``overrides`` (unknown fields raise, as for the official recipes)."""
    return TINY_RECIPES[name].replace(**overrides)


def tiny_recipe_file(folder: Union[str, os.PathLike], name: str = "mask_rcnn_tiny_test") -> str:
    """The tiny recipe written as FOLDER/NAME.json, for ``elsa det train --recipe FILE.json``."""
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_RECIPES[name].to_dict()))
    return str(path)
