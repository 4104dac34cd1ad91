"""The RPN of the official mmdetection 2.11 configs on torchvision's ``RegionProposalNetwork``.

What differs from torchvision's RPN, and why it matters for official weights and recipes:
- anchors (``FixedStrideAnchorGenerator``): mmdet places anchors at the fixed strides 4/8/16/32/64 with unrounded
  base anchors; torchvision derives each level's stride from the padded batch size (``image // grid``) and rounds
  the base anchors, which moves the P6 anchors by tens of pixels whenever the padded side / 32 is odd;
- targets (``MMDetRPN.assign_targets_to_anchors``): mmdet's MaxIoUAssigner. Anchors are matched only among the
  image's usable anchors: those on the image's own padded grid (``valid_flags``: a batch padded to a larger image
  adds anchors that get no target) and, with ``allowed_border >= 0``, lying inside the unpadded image with that
  margin (``anchor_inside_flags``; the cascade config uses 0). Low-quality matches give every gt its best anchors
  (all ties) only if that IoU is >= ``min_pos_iou`` (0.3), and overwrite in gt order; torchvision has no floor and
  keeps each anchor's own best gt;
- the box loss is mmdet's: L1 or smooth-L1 (beta 1/9), summed over positives / sampled anchors.
Proposal selection at test and train time (top-k per level, per-level NMS, top ``post_nms_top_n``) is torchvision's
and equals mmdet's RPNHead for these configs.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops


class FixedStrideAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator(strides, ratios, scales)`` (center_offset 0, scale-major) as a torchvision anchor
    generator: anchors of level i are ``base_i + (x * stride_i, y * stride_i)`` over that level's feature grid,
    whatever the padded image size, with base anchors ``(-w/2, -h/2, w/2, h/2)`` left unrounded.

    sizes[i]: anchor side at ratio 1 on level i (mmdet: ``scale * stride``); ratios are h / w.
    """

    def __init__(self, strides: Sequence[int], sizes: Sequence[float], aspect_ratios: Sequence[float]) -> None:
        if len(strides) != len(sizes):
            raise ValueError(f"strides and sizes need one entry per level, got {tuple(strides)} / {tuple(sizes)}")
        if any(s <= 0 for s in strides) or any(s <= 0 for s in sizes) or any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"strides, sizes and aspect_ratios must be > 0, got {tuple(strides)}, {tuple(sizes)}, "
                             f"{tuple(aspect_ratios)}")
        super().__init__(sizes=tuple((s,) for s in sizes), aspect_ratios=(tuple(aspect_ratios),) * len(sizes))
        self.strides = tuple(int(s) for s in strides)
        ratios = torch.tensor(list(aspect_ratios), dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        base = []
        for stride, size in zip(self.strides, sizes):
            scale = torch.tensor([size / stride], dtype=torch.float32)  # mmdet: base_size = stride, scales
            ws = (stride * w_ratios[:, None] * scale[None, :]).view(-1)
            hs = (stride * h_ratios[:, None] * scale[None, :]).view(-1)
            base.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1))
        self.base_anchors = base

    def grid_anchors_fixed(self, feature_sizes: Sequence[Tuple[int, int]], device: torch.device,
                           dtype: torch.dtype = torch.float32) -> List[Tensor]:
        """One (H_i * W_i * A, 4) tensor per level, ordered (y, x, anchor) like the RPN head's outputs."""
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"got {len(feature_sizes)} feature maps for {len(self.strides)} anchor strides")
        out = []
        for (h, w), stride, base in zip(feature_sizes, self.strides, self.base_anchors):
            sx = torch.arange(0, w, device=device) * stride
            sy = torch.arange(0, h, device=device) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).to(dtype)
            out.append((base.to(device=device, dtype=dtype)[None] + shifts[:, None]).view(-1, 4))
        return out

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:  # type: ignore[override]
        sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        # float32 whatever the features' dtype (as mmdet): fp16 cannot hold pixel coordinates above 2048 exactly
        anchors = torch.cat(self.grid_anchors_fixed(sizes, feature_maps[0].device))
        return [anchors for _ in range(len(image_list.image_sizes))]


def max_iou_assign(iou: Tensor, pos_thr: float, neg_thr: float, min_pos_iou: float,
                   match_low_quality: bool = True) -> Tensor:
    """mmdet's MaxIoUAssigner.assign_wrt_overlaps (gt_max_assign_all=True) on ``iou`` (G gts, N boxes).

    Returns (N,) int64: -1 ignore, 0 negative, i + 1 matched to gt i."""
    g, n = iou.shape
    assigned = torch.full((n,), -1, dtype=torch.int64, device=iou.device)
    if g == 0 or n == 0:
        if g == 0:
            assigned[:] = 0
        return assigned
    max_iou, argmax = iou.max(dim=0)
    gt_max = iou.max(dim=1).values
    assigned[(max_iou >= 0) & (max_iou < neg_thr)] = 0
    pos = max_iou >= pos_thr
    assigned[pos] = argmax[pos] + 1
    if match_low_quality:
        hit = (iou == gt_max[:, None]) & (gt_max[:, None] >= min_pos_iou)  # (G, N)
        any_hit = hit.any(dim=0)
        last = g - 1 - hit.flip(0).int().argmax(dim=0)  # the loop over gts lets the last one win
        assigned[any_hit] = last[any_hit] + 1
    return assigned


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN with mmdet's anchor targets and box loss (see the module docstring).

    box_loss: "l1" or "smooth_l1" (beta 1/9); allowed_border: -1 (all anchors of the image's padded grid) or a
    margin in pixels; min_pos_iou: the low-quality match floor; size_divisor: the per-image padding (mmdet's Pad).
    """

    def __init__(self, *args, box_loss: str = "l1", allowed_border: int = -1, min_pos_iou: float = 0.3,
                 size_divisor: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        if not isinstance(self.anchor_generator, FixedStrideAnchorGenerator):
            raise ValueError("anchor_generator must be a FixedStrideAnchorGenerator (valid flags need its strides)")
        self.box_loss = box_loss
        self.allowed_border = int(allowed_border)
        self.min_pos_iou = float(min_pos_iou)
        self.size_divisor = int(size_divisor)
        self.fg_iou_thresh = float(self.proposal_matcher.high_threshold)
        self.bg_iou_thresh = float(self.proposal_matcher.low_threshold)

    def usable_anchors(self, anchors: Tensor, image_size: Tuple[int, int],
                       feature_sizes: Sequence[Tuple[int, int]]) -> Tensor:
        """(N,) bool: anchors on the image's own padded grid (mmdet ``valid_flags``) and, if ``allowed_border >=
        0``, inside the unpadded image with that margin (``anchor_inside_flags``)."""
        h, w = int(image_size[0]), int(image_size[1])
        d = self.size_divisor
        pad_h, pad_w = math.ceil(h / d) * d, math.ceil(w / d) * d
        flags = []
        strides = self.anchor_generator.strides
        num_base = [len(b) for b in self.anchor_generator.base_anchors]
        for (fh, fw), stride, a in zip(feature_sizes, strides, num_base):
            vh, vw = min(math.ceil(pad_h / stride), fh), min(math.ceil(pad_w / stride), fw)
            vy = torch.arange(fh, device=anchors.device) < vh
            vx = torch.arange(fw, device=anchors.device) < vw
            flags.append((vy[:, None] & vx[None, :]).reshape(-1, 1).expand(-1, a).reshape(-1))
        valid = torch.cat(flags)
        if self.allowed_border >= 0:
            b = self.allowed_border
            valid = valid & (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) \
                & (anchors[:, 3] < h + b)
        return valid

    def assign_targets_to_anchors(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]],  # type: ignore
                                  image_sizes: Optional[List[Tuple[int, int]]] = None,
                                  feature_sizes: Optional[Sequence[Tuple[int, int]]] = None
                                  ) -> Tuple[List[Tensor], List[Tensor]]:
        """Labels per anchor (1 positive, 0 negative, -1 not used) and each anchor's matched gt box."""
        if image_sizes is None or feature_sizes is None:
            raise ValueError("MMDetRPN needs image_sizes and feature_sizes to assign anchor targets")
        labels, matched = [], []
        for anchors_i, target, size in zip(anchors, targets, image_sizes):
            gt = target["boxes"].to(anchors_i.dtype)
            use = self.usable_anchors(anchors_i, size, feature_sizes)
            lab = torch.full((len(anchors_i),), -1.0, dtype=torch.float32, device=anchors_i.device)
            box = anchors_i.float().clone()  # finite targets for unused anchors (never read)
            a = anchors_i[use]
            assigned = max_iou_assign(box_ops.box_iou(gt, a) if len(gt) else a.new_zeros((0, len(a))),
                                      self.fg_iou_thresh, self.bg_iou_thresh, self.min_pos_iou)
            lab[use] = (assigned > 0).float() - (assigned < 0).float()
            if len(gt):
                box[use] = gt[(assigned - 1).clamp(min=0)].float()
            labels.append(lab)
            matched.append(box)
        return labels, matched

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor],
                     regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        pred_bbox_deltas = pred_bbox_deltas.float()
        if self.box_loss == "l1":
            box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], targets[pos], beta=1 / 9, reduction="sum")
        box_loss = box_loss / max(sampled.numel(), 1)
        if sampled.numel() == 0:  # no usable anchor in the batch (tiny images with allowed_border=0): no RPN loss
            return objectness.sum() * 0, box_loss
        obj_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled].float(), labels_all[sampled])
        return obj_loss, box_loss

    def forward(self, images: ImageList, features: Dict[str, Tensor],  # type: ignore[override]
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        feats = list(features.values())
        objectness, pred_bbox_deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach().float(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            labels, matched = self.assign_targets_to_anchors(anchors, targets, images.image_sizes,
                                                             [tuple(f.shape[-2:]) for f in feats])
            regression_targets = self.box_coder.encode(matched, anchors)
            loss_obj, loss_box = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}
        return boxes, losses
