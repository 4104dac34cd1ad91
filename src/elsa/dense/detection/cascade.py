"""Cascade R-CNN RoI heads with a mask head per stage, as mmdetection's CascadeRoIHead (used by the official
ELSA-Swin cascade configs), built on torchvision's detection utilities so it drops into ``MaskRCNN.roi_heads``.

Training, per stage s: add the ground-truth boxes to the proposals, match at IoU ``stage_ious[s]`` (no low-quality
matches), sample ``batch_size_per_image`` RoIs with ``positive_fraction`` positives, compute classification, box
and mask losses weighted by ``stage_weights[s]``; then regress the sampled RoIs with this stage's deltas (class of
the ground truth for positives, arg-max class for negatives, ground-truth RoIs dropped), detached, as the next
stage's proposals.
Test: run the stages in turn refining the boxes, average the stages' classification logits, decode the last stage's
deltas on its input boxes, per-class NMS; masks are the mean of the stages' mask probabilities on the final boxes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

from .masks import mask_loss


class CascadeRoIHeads(nn.Module):
    """Drop-in for ``torchvision.models.detection.roi_heads.RoIHeads`` (same forward signature and outputs)."""

    def __init__(self, box_roi_pool: nn.Module, box_heads: nn.ModuleList, box_predictors: nn.ModuleList,
                 mask_roi_pool: nn.Module, mask_heads: nn.ModuleList, mask_predictors: nn.ModuleList,
                 stage_ious: Sequence[float], stage_stds: Sequence[Sequence[float]], stage_weights: Sequence[float],
                 class_agnostic: bool, box_loss: str, box_loss_weight: float, batch_size_per_image: int,
                 positive_fraction: float, score_thresh: float, nms_thresh: float, detections_per_img: int) -> None:
        super().__init__()
        n = len(stage_ious)
        if not (len(box_heads) == len(box_predictors) == len(mask_heads) == len(mask_predictors) == len(stage_stds)
                == len(stage_weights) == n):
            raise ValueError(f"every per-stage argument needs {n} entries (len(stage_ious))")
        if box_loss not in ("giou", "smooth_l1"):
            raise ValueError(f"box_loss must be 'giou' or 'smooth_l1', got {box_loss!r}")
        self.num_stages = n
        self.box_roi_pool = box_roi_pool
        self.box_heads = box_heads
        self.box_predictors = box_predictors
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = mask_heads
        self.mask_predictors = mask_predictors
        self.stage_ious = tuple(float(x) for x in stage_ious)
        self.stage_weights = tuple(float(x) for x in stage_weights)
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / s for s in std)) for std in stage_stds]
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in self.stage_ious]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.class_agnostic = class_agnostic
        self.box_loss = box_loss
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    # ---------------------------------------------------------------- helpers
    def _stage_forward(self, s: int, features: Dict[str, Tensor], rois: List[Tensor],
                       image_shapes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        x = self.box_roi_pool(features, rois, image_shapes)
        x = self.box_heads[s](x)
        return self.box_predictors[s](x)

    def _mask_logits(self, s: int, features: Dict[str, Tensor], rois: List[Tensor],
                     image_shapes: List[Tuple[int, int]]) -> Tensor:
        x = self.mask_roi_pool(features, rois, image_shapes)
        return self.mask_predictors[s](self.mask_heads[s](x))

    def _pick_deltas(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """deltas (N, K*4), labels (N,) -> (N, 4): the class's deltas (or the only ones if class-agnostic)."""
        deltas = deltas.reshape(deltas.shape[0], -1, 4)
        if self.class_agnostic:
            return deltas[:, 0]
        return deltas[torch.arange(deltas.shape[0], device=deltas.device), labels]

    def _sample(self, s: int, proposals: List[Tensor], gt_boxes: List[Tensor], gt_labels: List[Tensor]):
        rois, labels, matched, is_gt = [], [], [], []
        for props, gtb, gtl in zip(proposals, gt_boxes, gt_labels):
            props = torch.cat([props, gtb])
            flag = torch.cat([torch.zeros(len(props) - len(gtb), dtype=torch.bool, device=props.device),
                              torch.ones(len(gtb), dtype=torch.bool, device=props.device)])
            if gtb.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            else:
                m = self.matchers[s](box_ops.box_iou(gtb, props))
                idx = m.clamp(min=0)
                lab = gtl[idx].to(torch.int64)
                lab[m < 0] = 0  # below the stage IoU: background (thresholds equal, so nothing is "between")
            rois.append(props)
            labels.append(lab)
            matched.append(idx)
            is_gt.append(flag)
        pos, neg = self.sampler(labels)
        for i in range(len(rois)):
            keep = torch.where(pos[i] | neg[i])[0]
            rois[i], labels[i], matched[i], is_gt[i] = rois[i][keep], labels[i][keep], matched[i][keep], is_gt[i][keep]
        return rois, labels, matched, is_gt

    # ---------------------------------------------------------------- forward
    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        """Same contract as torchvision's RoIHeads.forward: (detections list, losses dict)."""
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(self, features, proposals, image_shapes, targets) -> Dict[str, Tensor]:
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        gt_masks = [t["masks"] for t in targets]
        proposals = [p.detach() for p in proposals]
        losses: Dict[str, Tensor] = {}
        for s in range(self.num_stages):
            w = self.stage_weights[s]
            rois, labels, matched, is_gt = self._sample(s, proposals, gt_boxes, gt_labels)
            logits, deltas = self._stage_forward(s, features, rois, image_shapes)
            all_labels = torch.cat(labels)
            all_rois = torch.cat(rois)
            n_sampled = max(all_labels.numel(), 1)
            loss_cls = F.cross_entropy(logits.float(), all_labels)
            pos = torch.where(all_labels > 0)[0]
            matched_gt = torch.cat([gb[m] if gb.numel() else torch.zeros(len(m), 4, device=all_rois.device)
                                    for gb, m in zip(gt_boxes, matched)])
            pred = self._pick_deltas(deltas, all_labels)[pos].float()
            if self.box_loss == "giou":
                decoded = self.box_coders[s].decode_single(pred, all_rois[pos].float())
                loss_box = generalized_box_iou_loss(decoded, matched_gt[pos].float(), reduction="sum")
            else:
                target = self.box_coders[s].encode_single(matched_gt[pos].float(), all_rois[pos].float())
                loss_box = F.smooth_l1_loss(pred, target, beta=1.0, reduction="sum")
            loss_box = self.box_loss_weight * loss_box / n_sampled
            # masks: the stage's positive RoIs
            pos_rois = [r[l > 0] for r, l in zip(rois, labels)]
            pos_matched = [m[l > 0] for m, l in zip(matched, labels)]
            mask_logits = self._mask_logits(s, features, pos_rois, image_shapes)
            pos_labels = [l[l > 0] for l in labels]
            loss_mask = mask_loss(mask_logits, pos_rois, gt_masks, pos_labels, pos_matched)
            losses[f"s{s}.loss_cls"] = w * loss_cls
            losses[f"s{s}.loss_box"] = w * loss_box
            losses[f"s{s}.loss_mask"] = w * loss_mask
            if s < self.num_stages - 1:
                with torch.no_grad():
                    reg_labels = torch.where(all_labels > 0, all_labels, logits[:, 1:].argmax(1) + 1)
                    boxes = self.box_coders[s].decode_single(self._pick_deltas(deltas, reg_labels).float(),
                                                             all_rois.float())
                    boxes = boxes.split([len(r) for r in rois])
                    proposals = [box_ops.clip_boxes_to_image(b[~g], shape).detach()
                                 for b, g, shape in zip(boxes, is_gt, image_shapes)]
        return losses

    @torch.no_grad()
    def _forward_test(self, features, proposals, image_shapes) -> List[Dict[str, Tensor]]:
        rois = proposals
        counts = [len(p) for p in proposals]
        ms_logits = []
        deltas = None
        for s in range(self.num_stages):
            logits, deltas = self._stage_forward(s, features, rois, image_shapes)
            ms_logits.append(logits.float())
            if s < self.num_stages - 1:
                label = logits[:, 1:].argmax(1) + 1
                boxes = self.box_coders[s].decode_single(self._pick_deltas(deltas, label).float(),
                                                         torch.cat(rois).float())
                rois = [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split(counts), image_shapes)]
        scores_all = F.softmax(torch.stack(ms_logits).mean(0), -1)
        num_classes = scores_all.shape[-1]
        deltas = deltas.float().reshape(deltas.shape[0], -1, 4)
        if self.class_agnostic:
            deltas = deltas.expand(-1, num_classes, -1)
        boxes_all = self.box_coders[-1].decode_single(deltas.reshape(deltas.shape[0], -1), torch.cat(rois).float())
        results = []
        for boxes, scores, shape in zip(boxes_all.split(counts), scores_all.split(counts), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes.reshape(-1, num_classes, 4), shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        det_boxes = [r["boxes"] for r in results]
        det_labels = torch.cat([r["labels"] for r in results])
        probs = None
        for s in range(self.num_stages):
            p = self._mask_logits(s, features, det_boxes, image_shapes).float().sigmoid()
            probs = p if probs is None else probs + p
        probs = probs / self.num_stages
        probs = probs[torch.arange(probs.shape[0], device=probs.device), det_labels][:, None]
        for r, m in zip(results, probs.split([len(b) for b in det_boxes])):
            r["masks"] = m
        return results
