"""Mask R-CNN and Cascade Mask R-CNN with an ELSA-Swin backbone, built from torchvision's detection parts.

Settings follow the official mmdetection configs (see ``elsa.dense.recipes_det``). Where torchvision's parts
differ from mmdetection's we say so here rather than silently:
- resizing: the dataset transforms do every training-time resize/crop (the official AutoAugment pipeline), so the
  model's ``GeneralizedRCNNTransform`` only normalises and pads to a multiple of 32 in training; at test time it
  resizes to ``test_size`` (short 800, long <= 1333, same scale rule as mmdet's keep-ratio Resize) and maps the
  detections back to the original image, so evaluation sees original coordinates.
- box regression losses follow the config: L1 for Mask R-CNN's RPN and box head (torchvision's default is
  smooth-L1 with beta 1/9, kept for the cascade RPN whose config says exactly that), same normalisation (sum over
  positives / sampled count). RoIAlign samples with ``aligned=True`` (half-pixel offset, mmcv's default that
  mmdet's configs use) and ``sampling_ratio=0``; the RoI-to-level rule is the same as mmdet's (finest_scale 56).
- RPN anchors and anchor targets are mmdet's (``rpn.py``): fixed strides, unrounded base anchors, MaxIoUAssigner
  with the 0.3 low-quality floor, valid flags and ``allowed_border``.
- mask targets (training) and mask pasting (test) are mmdet's (``masks.py``); the test-time resize rounds half-up
  like mmcv.imrescale and the detections are scaled back by dividing by mmdet's per-axis scale factor.
- initialisation follows mmdet: the box heads' FCs Xavier-uniform, cls N(0, 0.01), reg N(0, 0.001), zero biases;
  the mask predictor's biases zero (the convs are already Kaiming fan-out as mmcv's ConvModule).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _filter_input, _setup_scales

from ..backbone import ELSASwinBackbone
from ..recipes_det import DetRecipe
from .cascade import CascadeRoIHeads
from .masks import mask_loss, paste_masks
from .rpn import FixedStrideAnchorGenerator, MMDetRPN, max_iou_assign

_logger = logging.getLogger(__name__)


class TimmBody(nn.Module):
    """A timm ``features_only`` model as a list-of-NCHW-maps body (used by the benchmark for timm's Swin-T)."""

    def __init__(self, name: str, img_size: Optional[Tuple[int, int]] = None, **kwargs) -> None:
        super().__init__()
        import timm

        if img_size is not None:
            kwargs["img_size"] = img_size
        kwargs.setdefault("strict_img_size", False)  # any (padded) input size, as the detector needs
        self.model = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        self.out_channels = list(self.model.feature_info.channels())
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._nhwc = getattr(fmt, "value", fmt) == "NHWC"  # timm's swin returns NHWC maps

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = self.model(x)
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return feats


class BackboneWithFPN(nn.Module):
    """body (list of maps at strides 4..32) -> FPN with a max-pooled 5th level (mmdet FPN num_outs=5,
    add_extra_convs=False). Returns OrderedDict '0'..'3','pool' of (B, out_channels, H_i, W_i)."""

    def __init__(self, body: nn.Module, in_channels: List[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        for m in self.fpn.modules():  # mmdet's FPN init: Xavier uniform, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class DetTransform(GeneralizedRCNNTransform):
    """Normalise + pad to 32 always; resize only in eval mode (training images come resized by the dataset).

    The eval resize is mmdet's test pipeline (keep-ratio Resize to ``(max_size, min_size)``): scale = min(short /
    min(h, w), long / max(h, w)), new side = int(side * scale + 0.5) (mmcv.imrescale; torchvision floors), bilinear
    with half-pixel centres. ``postprocess`` divides the boxes by mmdet's scale factor (new_w / w, new_h / h) and
    pastes the masks with ``paste_masks`` at the original size."""

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):  # type: ignore[override]
        if self.training:
            return image, target
        h, w = image.shape[-2:]
        nh, nw = rescaled_size(h, w, self.min_size[-1], self.max_size)
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        if target is not None and "boxes" in target:
            target = dict(target)
            target["boxes"] = target["boxes"] * target["boxes"].new_tensor([nw / w, nh / h, nw / w, nh / h])
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],  # type: ignore
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, (nh, nw), (h, w) in zip(result, image_shapes, original_image_sizes):
            scale = pred["boxes"].new_tensor([nw / w, nh / h, nw / w, nh / h])
            pred["boxes"] = pred["boxes"] / scale
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], int(h), int(w))
        return result


def rescaled_size(h: int, w: int, short: int, long: int) -> Tuple[int, int]:
    """(new_h, new_w) of mmcv.imrescale(img, (long, short)): half-up rounding of side * min(short / min(h, w),
    long / max(h, w))."""
    scale = min(short / min(h, w), long / max(h, w))
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)  # >= 1: a 4000x3 image still has a row


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping: level = floor(log2(sqrt(area) / 56)) clamped, as
    mmdet's SingleRoIExtractor) sampling with ``aligned=True`` like mmcv's RoIAlign in the official configs."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],  # type: ignore[override]
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, spatial_scale=scale,
                                 sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class MMDetRoIHeads(RoIHeads):
    """torchvision's RoIHeads (sampling and inference unchanged) with mmdet's training rules: proposals are matched
    by mmdet's MaxIoUAssigner (the Mask R-CNN config: pos = neg = min_pos_iou = 0.5 with low-quality matches), the
    box loss is L1 (class-specific deltas of the positives, summed, divided by the number of sampled RoIs) or
    torchvision's smooth-L1, and the mask loss uses mmdet's aligned, binarised targets (``masks.mask_loss``)."""

    def __init__(self, *args, box_loss: str = "l1", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        self.box_loss = box_loss

    def assign_targets_to_proposals(self, proposals: List[Tensor], gt_boxes: List[Tensor],  # type: ignore[override]
                                    gt_labels: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        pos_thr = float(self.proposal_matcher.high_threshold)
        neg_thr = float(self.proposal_matcher.low_threshold)
        matched_idxs, labels = [], []
        for props, boxes, gl in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            else:
                assigned = max_iou_assign(box_ops.box_iou(boxes, props), pos_thr, neg_thr, min_pos_iou=pos_thr)
                idx = (assigned - 1).clamp(min=0)
                lab = gl[idx].to(torch.int64)
                lab[assigned == 0] = 0
                lab[assigned < 0] = -1
            matched_idxs.append(idx)
            labels.append(lab)
        return matched_idxs, labels

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets must be given in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        loss_cls, loss_box = fastrcnn_loss(class_logits.float(), box_regression.float(), labels, regression_targets)
        if self.box_loss == "l1":
            all_labels = torch.cat(labels)
            pos = torch.where(all_labels > 0)[0]
            deltas = box_regression.float().reshape(box_regression.shape[0], -1, 4)[pos, all_labels[pos]]
            loss_box = F.l1_loss(deltas, torch.cat(regression_targets)[pos], reduction="sum") \
                / max(all_labels.numel(), 1)
        mask_props = [p[l > 0] for p, l in zip(proposals, labels)]
        mask_idxs = [m[l > 0] for m, l in zip(matched_idxs, labels)]
        mask_labels = [l[l > 0] for l in labels]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_props, image_shapes)))
        loss_mask = mask_loss(mask_logits, mask_props, [t["masks"] for t in targets], mask_labels, mask_idxs)
        return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}


def init_box_head(head: nn.Module, predictor: nn.Module) -> None:
    """mmdet's ConvFCBBoxHead / BBoxHead init: every Linear of the head (shared FCs) Xavier-uniform with zero bias,
    fc_cls N(0, 0.01) and fc_reg N(0, 0.001) with zero bias. (Convs stay Kaiming fan-out, as mmcv's ConvModule.)"""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)


def _mask_predictor(recipe: DetRecipe, num_classes: int) -> MaskRCNNPredictor:
    """torchvision's predictor (Kaiming fan-out weights) with zero biases, as mmdet's FCNMaskHead.init_weights."""
    p = MaskRCNNPredictor(recipe.mask_head_channels, recipe.mask_head_channels, num_classes)
    for m in p.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.zeros_(m.bias)
    return p


def build_body(recipe: DetRecipe, img_size: Optional[Tuple[int, int]] = None) -> nn.Module:
    """The backbone named by the recipe: ``elsa_swin_*`` (ELSASwinBackbone) or ``timm:<name>`` (TimmBody)."""
    if recipe.backbone.startswith("timm:"):
        return TimmBody(recipe.backbone[5:], img_size=img_size, drop_path_rate=recipe.drop_path_rate,
                        **recipe.backbone_kwargs)
    body = ELSASwinBackbone.from_name(recipe.backbone, out_indices=(0, 1, 2, 3), frozen_stages=recipe.frozen_stages,
                                      drop_path_rate=recipe.drop_path_rate, **recipe.backbone_kwargs)
    if recipe.grad_checkpointing:
        body.set_grad_checkpointing()
    return body


def _box_head(recipe: DetRecipe) -> nn.Module:
    c, rep = recipe.fpn_channels, recipe.representation_size
    if recipe.box_head == "2fc":
        return TwoMLPHead(c * 7 * 7, rep)
    if recipe.box_head == "4conv1fc":
        return FastRCNNConvFCHead((c, 7, 7), [c] * 4, [rep], norm_layer=nn.BatchNorm2d)
    raise ValueError(f"box_head must be '2fc' or '4conv1fc', got {recipe.box_head!r}")


def build_detector(recipe: DetRecipe, body: Optional[nn.Module] = None,
                   img_size: Optional[Tuple[int, int]] = None) -> MaskRCNN:
    """Mask R-CNN (``recipe.arch == "mask_rcnn"``) or Cascade Mask R-CNN (``"cascade_mask_rcnn"``).

    The model follows torchvision's contract: ``model(images: list of (3, H, W) floats in [0, 1], targets)``
    returns a loss dict in training and a list of {boxes (N, 4) xyxy, labels (N,) in 1..num_classes, scores (N,),
    masks (N, 1, H, W) probabilities} in eval mode, in the input images' coordinates.
    """
    if recipe.arch not in ("mask_rcnn", "cascade_mask_rcnn"):
        raise ValueError(f"arch must be 'mask_rcnn' or 'cascade_mask_rcnn', got {recipe.arch!r}")
    if recipe.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {recipe.num_classes}")
    body = body if body is not None else build_body(recipe, img_size=img_size)
    backbone = BackboneWithFPN(body, list(body.out_channels), recipe.fpn_channels)
    c = recipe.fpn_channels
    n_levels = 5
    if len(recipe.anchor_sizes) != n_levels:
        raise ValueError(f"anchor_sizes must have {n_levels} entries (one per FPN level), got {recipe.anchor_sizes}")
    if len(recipe.anchor_strides) != n_levels:
        raise ValueError(f"anchor_strides must have {n_levels} entries (one per FPN level), got "
                         f"{recipe.anchor_strides}")
    anchors = FixedStrideAnchorGenerator(recipe.anchor_strides, recipe.anchor_sizes, recipe.aspect_ratios)
    rpn_head = RPNHead(c, len(recipe.aspect_ratios))
    names = ["0", "1", "2", "3"]
    box_pool = AlignedMultiScaleRoIAlign(names, output_size=7, sampling_ratio=0)
    mask_pool = AlignedMultiScaleRoIAlign(names, output_size=14, sampling_ratio=0)
    k = recipe.num_classes + 1  # torchvision: label 0 is background
    if recipe.rpn_box_loss not in ("l1", "smooth_l1") or recipe.rcnn_box_loss not in ("l1", "smooth_l1"):
        raise ValueError(f"rpn_box_loss / rcnn_box_loss must be 'l1' or 'smooth_l1', got "
                         f"{recipe.rpn_box_loss!r} / {recipe.rcnn_box_loss!r}")
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=recipe.test_size[0], max_size=recipe.test_size[1],
        image_mean=list(recipe.image_mean), image_std=list(recipe.image_std),
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=box_pool, box_head=_box_head(recipe),
        box_predictor=FastRCNNPredictor(recipe.representation_size, k),
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(c, [recipe.mask_head_channels] * recipe.mask_head_convs, 1),
        mask_predictor=_mask_predictor(recipe, k),
    )
    model.rpn = MMDetRPN(
        anchors, rpn_head, recipe.rpn_fg_iou_thresh, recipe.rpn_bg_iou_thresh, recipe.rpn_batch_size_per_image,
        recipe.rpn_positive_fraction,
        {"training": recipe.rpn_pre_nms_top_n_train, "testing": recipe.rpn_pre_nms_top_n_test},
        {"training": recipe.rpn_post_nms_top_n_train, "testing": recipe.rpn_post_nms_top_n_test},
        recipe.rpn_nms_thresh, box_loss=recipe.rpn_box_loss, allowed_border=recipe.rpn_allowed_border,
        min_pos_iou=recipe.rpn_min_pos_iou)
    model.transform = DetTransform(recipe.test_size[0], recipe.test_size[1], list(recipe.image_mean),
                                   list(recipe.image_std), size_divisible=32)
    if recipe.arch == "mask_rcnn":
        rh = model.roi_heads
        init_box_head(rh.box_head, rh.box_predictor)
        model.roi_heads = MMDetRoIHeads(
            rh.box_roi_pool, rh.box_head, rh.box_predictor, 0.5, 0.5, recipe.box_batch_size_per_image,
            recipe.box_positive_fraction, tuple(1.0 / s for s in recipe.cascade_stds[0]),  # mmdet target_stds
            recipe.box_score_thresh, recipe.box_nms_thresh, recipe.box_detections_per_img,
            mask_roi_pool=rh.mask_roi_pool, mask_head=rh.mask_head, mask_predictor=rh.mask_predictor,
            box_loss=recipe.rcnn_box_loss)
    else:
        n = len(recipe.cascade_ious)
        reg_k = 1 if recipe.cascade_class_agnostic else k
        box_heads = nn.ModuleList([_box_head(recipe) for _ in range(n)])
        box_predictors = nn.ModuleList([CascadePredictor(recipe.representation_size, k, reg_k) for _ in range(n)])
        for head, predictor in zip(box_heads, box_predictors):
            init_box_head(head, predictor)
        model.roi_heads = CascadeRoIHeads(
            box_roi_pool=box_pool, box_heads=box_heads, box_predictors=box_predictors,
            mask_roi_pool=mask_pool,
            mask_heads=nn.ModuleList([MaskRCNNHeads(c, [recipe.mask_head_channels] * recipe.mask_head_convs, 1)
                                      for _ in range(n)]),
            mask_predictors=nn.ModuleList([_mask_predictor(recipe, k) for _ in range(n)]),
            stage_ious=recipe.cascade_ious, stage_stds=recipe.cascade_stds,
            stage_weights=recipe.cascade_stage_weights, class_agnostic=recipe.cascade_class_agnostic,
            box_loss=recipe.cascade_box_loss, box_loss_weight=recipe.cascade_box_loss_weight,
            batch_size_per_image=recipe.box_batch_size_per_image, positive_fraction=recipe.box_positive_fraction,
            score_thresh=recipe.box_score_thresh, nms_thresh=recipe.box_nms_thresh,
            detections_per_img=recipe.box_detections_per_img,
        )
    return model


class CascadePredictor(nn.Module):
    """cls (num_classes + 1 logits) and box deltas ((reg_classes) x 4) from one stage's box features."""

    def __init__(self, in_channels: int, num_classes: int, reg_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, reg_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)
