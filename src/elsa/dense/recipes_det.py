"""Detection / instance-segmentation recipes: the official ELSA-Swin COCO configs (det/configs/elsa_swin/*.py)
as plain values; a custom recipe (e.g. a tiny detector for tests) is given as a JSON file of its fields.

Why a dataclass and not YAML: every field has a type and a default taken from the official mmdetection base
config, and one recipe differs from another in a handful of fields (backbone, drop-path, schedule, detector);
``replace`` makes those differences explicit. Values below cite the official file they come from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine.recipe import Recipe

# mmdetection's Resize img_scale list of the official train pipeline: short side 480..800 step 32, long side <= 1333.
MULTI_SCALES: Tuple[int, ...] = tuple(range(480, 801, 32))


@dataclass(frozen=True)
class DetRecipe(Recipe):
    """Everything ``elsa det`` needs to build, train and test one detector."""

    name: str = "custom"
    arch: str = "mask_rcnn"  # "mask_rcnn" | "cascade_mask_rcnn"
    # backbone
    backbone: str = "elsa_swin_tiny"  # a MODEL_ARGS name of elsa.models.elsa_swin, or "timm:<name>" (benchmarks)
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # overrides of the architecture (tests)
    drop_path_rate: float = 0.2
    frozen_stages: int = -1
    grad_checkpointing: bool = False
    # neck and heads (official _base_/models/mask_rcnn_elsa_swin_fpn.py)
    num_classes: int = 80
    fpn_channels: int = 256
    anchor_strides: Tuple[int, ...] = (4, 8, 16, 32, 64)  # mmdet AnchorGenerator strides (fixed, not derived)
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)  # scales=[8] x strides 4..64
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_min_pos_iou: float = 0.3  # MaxIoUAssigner min_pos_iou: floor of the low-quality matches
    rpn_allowed_border: int = -1  # train_cfg.rpn.allowed_border: -1 Mask R-CNN, 0 cascade (anchors inside image)
    # box regression losses: "l1" (mmdet L1Loss, the official Mask R-CNN config) or "smooth_l1" (beta 1/9,
    # torchvision's choice and the official cascade config's RPN loss)
    rpn_box_loss: str = "l1"
    rcnn_box_loss: str = "l1"
    box_head: str = "2fc"  # "2fc" (Shared2FCBBoxHead) | "4conv1fc" (ConvFCBBoxHead, 4 convs + BN + 1 fc)
    representation_size: int = 1024
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    mask_head_channels: int = 256
    mask_head_convs: int = 4
    mask_thresh: float = 0.5
    # cascade (official _base_/models/cascade_mask_rcnn_elsa_swin_fpn.py + the elsa_swin/cascade_* overrides)
    cascade_ious: Tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_stds: Tuple[Tuple[float, float, float, float], ...] = (
        (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
    cascade_stage_weights: Tuple[float, ...] = (1.0, 0.5, 0.25)
    cascade_class_agnostic: bool = False
    cascade_box_loss: str = "giou"  # "giou" (reg_decoded_bbox, GIoULoss) | "smooth_l1"
    cascade_box_loss_weight: float = 10.0
    # data (official train_pipeline: flip, then AutoAugment of [multi-scale] or [resize, crop, multi-scale])
    train_scales: Tuple[int, ...] = MULTI_SCALES
    max_size: int = 1333
    crop_prescales: Tuple[int, ...] = (400, 500, 600)
    crop_size: Tuple[int, int] = (384, 600)
    detr_crop: bool = True  # False: only the multi-scale policy
    flip_prob: float = 0.5
    test_size: Tuple[int, int] = (800, 1333)  # short side, long side cap
    image_mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)  # mmdet's 123.675,116.28,103.53 / 255
    image_std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    # optimisation (official optimizer / lr_config / runner)
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    # mmcv paramwise_cfg custom_keys with decay_mult 0: a parameter whose name CONTAINS one of these gets no decay.
    no_decay_keys: Tuple[str, ...] = ("absolute_pos_embed", "relative_position_bias_table", "norm")
    epochs: int = 12
    lr_steps: Tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    batch_size: int = 2  # per GPU (samples_per_gpu); the official runs use 8 GPUs -> 16 images per step
    workers: int = 2
    amp: bool = True  # fp16 autocast + loss scaling on CUDA (the official DistOptimizerHook use_fp16=True)
    amp_dtype: str = "float16"  # "bfloat16": bf16 autocast, also on CPU (no loss scaling needed)
    # quick-run overrides: total iterations instead of epochs (lr steps scaled to the same fractions)
    max_iters: Optional[int] = None


def _official(arch: str, size: str, schedule: str) -> DetRecipe:
    # drop_path_rate as in each official config file (they differ from the paper's "0.1 T / 0.2 S" summary):
    # mask tiny 1x 0.1, 3x 0.2; mask small 1x 0.2, 3x 0.75; cascade tiny 1x 0.0, 3x 0.2; cascade small 1x 0.2, 3x 0.75.
    dpr = {
        ("mask_rcnn", "tiny", "1x"): 0.1, ("mask_rcnn", "tiny", "3x"): 0.2,
        ("mask_rcnn", "small", "1x"): 0.2, ("mask_rcnn", "small", "3x"): 0.75,
        ("cascade_mask_rcnn", "tiny", "1x"): 0.0, ("cascade_mask_rcnn", "tiny", "3x"): 0.2,
        ("cascade_mask_rcnn", "small", "1x"): 0.2, ("cascade_mask_rcnn", "small", "3x"): 0.75,
    }[(arch, size, schedule)]
    epochs, steps = (12, (8, 11)) if schedule == "1x" else (36, (27, 33))
    r = DetRecipe(name=f"{arch}_elsa_swin_{size}_{schedule}", arch=arch, backbone=f"elsa_swin_{size}",
                  drop_path_rate=dpr, epochs=epochs, lr_steps=steps)
    if arch == "cascade_mask_rcnn":
        # cascade base: rpn_proposal max_per_img 2000 in training; the elsa_swin/cascade_* files replace the
        # Shared2FC heads by ConvFCBBoxHead(4 convs + SyncBN, 1 fc), class-specific, GIoU loss x10 on decoded boxes.
        # Its train_cfg.rpn has allowed_border=0: only anchors inside the image get RPN targets.
        r = r.replace(rpn_post_nms_top_n_train=2000, rpn_box_loss="smooth_l1", box_head="4conv1fc",
                      rpn_allowed_border=0, cascade_class_agnostic=False,
                      cascade_box_loss="giou", cascade_box_loss_weight=10.0)
    return r


RECIPES: Dict[str, DetRecipe] = {}
for _arch in ("mask_rcnn", "cascade_mask_rcnn"):
    for _size in ("tiny", "small"):
        for _sched in ("1x", "3x"):
            _r = _official(_arch, _size, _sched)
            RECIPES[_r.name] = _r

def get_recipe(name: str, **overrides: Any) -> DetRecipe:
    """The named recipe, or the recipe of a ``.json`` file (``DetRecipe.to_dict()`` of a custom detector), with
    ``overrides`` applied (e.g. ``num_classes=3``, ``max_iters=100``)."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--recipe: no recipe file {name!r}")
        try:
            recipe = DetRecipe.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"--recipe file {name!r} is not a DetRecipe: {err}") from err
    elif name in RECIPES:
        recipe = RECIPES[name]
    else:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)} or a .json recipe file, got {name!r}")
    return recipe.replace(**overrides) if overrides else recipe


def list_recipes() -> List[str]:
    return sorted(RECIPES)
