"""Mask targets (training) and mask pasting (test) as mmdetection 2.11 does them for the official configs.

- targets (``mask_targets``, mmdet ``mask_target_single`` + ``BitmapMasks.crop_and_resize``): each positive RoI,
  clipped to the image's padded size, is RoIAligned (``aligned=True``, adaptive sampling) from its gt mask padded
  with zeros to a multiple of 32 (mmdet's Pad pads the masks too, which decides the values at the bottom and right
  borders), then binarised at >= 0.5. torchvision's ``maskrcnn_loss`` samples unaligned and keeps soft targets.
- pasting (``paste_masks``, mmdet ``_do_paste_mask``): the M x M probabilities are bilinearly sampled
  (``grid_sample``) at the pixel centres of the float box; callers keep ``>= 0.5``. torchvision pastes into an
  integer box grown by one pixel (``paste_masks_in_image``).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def mask_targets(boxes: Tensor, gt_masks: Tensor, matched_idxs: Tensor, size: int,
                 size_divisor: int = 32) -> Tensor:
    """(P, size, size) float 0/1 targets for boxes (P, 4) xyxy in the image, gt_masks (G, H, W) of the unpadded
    image, matched_idxs (P,) indices into gt_masks."""
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size), dtype=torch.float32)
    h, w = gt_masks.shape[-2:]
    ph, pw = math.ceil(h / size_divisor) * size_divisor, math.ceil(w / size_divisor) * size_divisor
    boxes = boxes.detach().float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, pw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ph)
    used, inverse = torch.unique(matched_idxs, return_inverse=True)  # pad and sample only the matched masks
    masks = F.pad(gt_masks[used].float(), (0, pw - w, 0, ph - h))[:, None]
    rois = torch.cat([inverse.to(boxes.dtype)[:, None], boxes], dim=1)
    out = roi_align(masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
    return (out >= 0.5).float()


def mask_loss(mask_logits: Tensor, boxes: List[Tensor], gt_masks: List[Tensor], labels: List[Tensor],
              matched_idxs: List[Tensor]) -> Tensor:
    """Mean binary cross-entropy of each positive RoI's class-``labels`` mask against ``mask_targets`` (mmdet
    FCNMaskHead.loss with CrossEntropyLoss(use_mask=True)). Lists are per image; ``labels`` are the RoIs' classes."""
    size = mask_logits.shape[-1]
    targets = [mask_targets(b, m, i, size) for b, m, i in zip(boxes, gt_masks, matched_idxs)]
    labels_all = torch.cat(labels)
    if labels_all.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels_all.shape[0], device=labels_all.device), labels_all]
    return F.binary_cross_entropy_with_logits(logits.float(), torch.cat(targets).to(logits.device))


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """masks (N, 1, M, M) probabilities, boxes (N, 4) xyxy in the output image -> (N, 1, height, width).

    Each mask is sampled only over [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1) (mmdet's CPU
    path); outside it the result is 0. Samples there are < 0.5 in mmdet's whole-image GPU path too, so the
    binary masks (>= 0.5) are the same either way."""
    out = masks.new_zeros((len(masks), 1, height, width), dtype=torch.float32)
    boxes = boxes.float()
    for i in range(len(masks)):
        x0, y0, x1, y1 = boxes[i]
        xs = max(int(math.floor(float(x0))) - 1, 0)
        ys = max(int(math.floor(float(y0))) - 1, 0)
        xe = min(int(math.ceil(float(x1))) + 1, width)
        ye = min(int(math.ceil(float(y1))) + 1, height)
        if xe <= xs or ye <= ys:
            continue
        gx = (torch.arange(xs, xe, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        gy = (torch.arange(ys, ye, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        gx = torch.where(torch.isinf(gx), torch.zeros_like(gx), gx)  # zero-width box: mmdet's guard
        gy = torch.where(torch.isinf(gy), torch.zeros_like(gy), gy)
        grid = torch.stack([gx[None, :].expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], dim=-1)
        out[i, 0, ys:ye, xs:xe] = F.grid_sample(masks[i:i + 1].float(), grid[None], align_corners=False)[0, 0]
    return out
