"""COCO box and mask AP through the official COCO API (pycocotools), so numbers are comparable with papers.

``CocoEvaluator`` collects detections per image (boxes xyxy in original image coordinates, labels 1..K, scores,
mask probabilities), converts them to COCO result records (xywh boxes, RLE masks of the pixels >= 0.5 as mmdet's
``mask_thr_binary``, category ids mapped back), and runs COCOeval for "bbox" and "segm".
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

_logger = logging.getLogger(__name__)

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def load_coco(ann_file: str):
    """A pycocotools COCO object, without its load-time prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def coco_from_dict(dataset: dict):
    """A pycocotools COCO object over an in-memory dataset (the records ``CocoInstances`` checked)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_coco_results(image_id: int, pred: Dict[str, Tensor], label_to_cat: Sequence[int],
                    mask_thresh: float = 0.5) -> List[dict]:
    """One image's predictions -> COCO result dicts. pred: boxes (N, 4) xyxy, labels (N,) in 1..K, scores (N,),
    optional masks (N, 1, H, W) probabilities (a pixel is in the mask if >= mask_thresh, as mmdet).
    label_to_cat[k - 1] is the COCO category id of label k."""
    from pycocotools import mask as mask_utils

    boxes = pred["boxes"].detach().float().cpu().numpy()
    scores = pred["scores"].detach().float().cpu().numpy()
    labels = pred["labels"].detach().cpu().numpy()
    rles = None
    if "masks" in pred:
        m = (pred["masks"].detach()[:, 0] >= mask_thresh).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0))) if len(m) else []
    out = []
    for i in range(len(boxes)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        rec = {"image_id": int(image_id), "category_id": int(label_to_cat[int(labels[i]) - 1]),
               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])}
        if rles is not None:
            rle = dict(rles[i])
            rle["counts"] = rle["counts"].decode("ascii")
            rec["segmentation"] = rle
        out.append(rec)
    return out


def evaluate_coco(coco_gt, results: List[dict], iou_types: Sequence[str] = ("bbox", "segm"),
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, float]]:
    """COCOeval on ``results`` (COCO result dicts). Returns {iou_type: {AP, AP50, AP75, APs, APm, APl, AR...,
    "table": the printed summary}}; AP values in [0, 1], -1 where COCO reports no ground truth."""
    from pycocotools.cocoeval import COCOeval

    out: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        res = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not res:
            out[iou_type] = {k: 0.0 for k in STAT_NAMES}
            out[iou_type]["table"] = "no detections"
            continue
        if iou_type == "segm":  # as mmdet: without 'bbox', loadRes takes each instance's area from its mask
            res = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(res))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
        stats["table"] = "\n".join(line for line in buf.getvalue().splitlines()
                                    if line.lstrip().startswith("Average"))
        out[iou_type] = stats
    return out


class CocoEvaluator:
    """Accumulate predictions image by image, then ``summarize()`` with the COCO API."""

    def __init__(self, coco_gt, label_to_cat: Sequence[int], iou_types: Sequence[str] = ("bbox", "segm"),
                 mask_thresh: float = 0.5) -> None:
        self.coco_gt = coco_gt
        self.label_to_cat = list(label_to_cat)
        self.iou_types = tuple(iou_types)
        self.mask_thresh = mask_thresh
        self.results: List[dict] = []
        self.image_ids: List[int] = []
        self.unreadable = 0  # images the caller could not read (left out of the results)

    def update(self, image_ids: Sequence[int], preds: Sequence[Dict[str, Tensor]]) -> None:
        for image_id, pred in zip(image_ids, preds):
            self.image_ids.append(int(image_id))
            self.results.extend(to_coco_results(int(image_id), pred, self.label_to_cat, self.mask_thresh))

    def gather(self) -> None:
        """Merge results from all ranks (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            parts: List = [None] * world
            torch.distributed.all_gather_object(parts, (self.image_ids, self.results))
            self.image_ids = sorted({i for ids, _ in parts for i in ids})
            self.results = [r for _, res in parts for r in res]

    def summarize(self) -> Dict[str, Dict[str, float]]:
        return evaluate_coco(self.coco_gt, self.results, self.iou_types, image_ids=sorted(set(self.image_ids)))
