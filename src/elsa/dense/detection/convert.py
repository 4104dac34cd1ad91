"""Official (mmdetection 2.x) ELSA-Swin detector checkpoints -> this package's torchvision-based detectors.

The one place that knows mmdetection's parameter names (``neck.lateral_convs.i.conv``, ``rpn_head.rpn_cls``,
``roi_head.bbox_head[.s].shared_fcs``, ``roi_head.mask_head[.s].conv_logits``, ...). Besides renaming, class
layouts differ: mmdet puts the background logit LAST and has no background rows in class-specific box deltas and
mask logits, torchvision puts background at index 0 -- so those rows are moved / zero-padded. Anchor order, delta
layout and FPN level order are the same in both (checked against the mmdet 2.x source).
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import Tensor

_RULES: List[Tuple[str, str]] = [
    (r"^backbone\.(.*)$", r"backbone.body.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(.*)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(.*)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(.*)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(.*)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(.*)$", r"rpn.head.bbox_pred.\1"),
    # Mask R-CNN (StandardRoIHead, Shared2FCBBoxHead, FCNMaskHead)
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(.*)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(.*)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(.*)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(.*)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(.*)$", r"roi_heads.mask_head.\1.0.\2"),
    (r"^roi_head\.mask_head\.upsample\.(.*)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(.*)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
    # Cascade (CascadeRoIHead: one bbox head and one mask head per stage)
    (r"^roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.conv\.(.*)$", r"roi_heads.box_heads.\1.\2.0.\3"),
    (r"^roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.bn\.(.*)$", r"roi_heads.box_heads.\1.\2.1.\3"),
    (r"^roi_head\.bbox_head\.(\d+)\.fc_cls\.(.*)$", r"roi_heads.box_predictors.\1.cls_score.\2"),
    (r"^roi_head\.bbox_head\.(\d+)\.fc_reg\.(.*)$", r"roi_heads.box_predictors.\1.bbox_pred.\2"),
    (r"^roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\.(.*)$", r"roi_heads.mask_heads.\1.\2.0.\3"),
    (r"^roi_head\.mask_head\.(\d+)\.upsample\.(.*)$", r"roi_heads.mask_predictors.\1.conv5_mask.\2"),
    (r"^roi_head\.mask_head\.(\d+)\.conv_logits\.(.*)$", r"roi_heads.mask_predictors.\1.mask_fcn_logits.\2"),
]


def is_mmdet_state_dict(sd: Dict[str, Tensor]) -> bool:
    return any(k.startswith(("roi_head.", "neck.", "rpn_head.")) for k in sd)


def _cascade_fc(sd: Dict[str, Tensor], key: str) -> str:
    """roi_head.bbox_head.S.shared_fcs.J.*: after the stage's N shared convs (+ a Flatten) in
    FastRCNNConvFCHead, or fc6/fc7 of a TwoMLPHead when the stage has no convs."""
    m = re.match(r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.(\d+)\.(.*)$", key)
    s, j, rest = m.group(1), int(m.group(2)), m.group(3)
    n_convs = len({k.split(".")[4] for k in sd if k.startswith(f"roi_head.bbox_head.{s}.shared_convs.")})
    if n_convs == 0:
        return f"roi_heads.box_heads.{s}.fc{6 + j}.{rest}"
    return f"roi_heads.box_heads.{s}.{n_convs + 1 + 2 * j}.{rest}"


def convert_mmdet_state_dict(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename an official mmdet Mask R-CNN / Cascade Mask R-CNN state dict for ``build_detector``'s model and move
    class rows to torchvision's layout. Keys no rule knows (e.g. ``backbone.*.attn_mask`` buffers) are dropped."""
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if re.match(r"^roi_head\.bbox_head\.\d+\.shared_fcs\.", key):
            new = _cascade_fc(sd, key)
        else:
            new = None
            for pattern, repl in _RULES:
                if re.match(pattern, key):
                    new = re.sub(pattern, repl, key)
                    break
        if new is None or key.endswith("attn_mask"):
            continue
        if ".cls_score." in new:  # (C + 1, ...) with background last -> background first
            value = torch.cat([value[-1:], value[:-1]])
        elif ".bbox_pred." in new and new.startswith("roi_heads") and value.shape[0] != 4:  # class-specific 4C
            value = torch.cat([value.new_zeros((4, *value.shape[1:])), value])
        elif ".mask_fcn_logits." in new and value.shape[0] != 1:  # C mask logits -> background row first
            value = torch.cat([value.new_zeros((1, *value.shape[1:])), value])
        out[new] = value
    return out
