"""Semantic-segmentation metrics accumulated over a dataset, as mmseg's ``eval_metrics``.

Per class k over all images: intersection I_k, union U_k = P_k + L_k - I_k (P: predicted pixels, L: labelled
pixels), ignoring pixels whose label is ``ignore_index``. IoU_k = I_k / U_k, Acc_k = I_k / L_k; a class with a zero
denominator gives NaN and is left out of the means (mIoU, mAcc). aAcc = sum I / sum L.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .segmentor import IGNORE_INDEX


def intersect_and_union(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """pred, label: integer maps of equal shape -> (area_intersect, area_union, area_pred, area_label), each (K,)
    float64 histograms over the pixels whose label is not ``ignore_index``."""
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {tuple(pred.shape)} and {tuple(label.shape)}")
    mask = label != ignore_index
    p, l = pred[mask].long(), label[mask].long()
    inter = p[p == l]

    def hist(x: Tensor) -> Tensor:
        x = x[(x >= 0) & (x < num_classes)]
        return torch.bincount(x, minlength=num_classes).double()

    ai, ap, al = hist(inter), hist(p), hist(l)
    return ai, ap + al - ai, ap, al


@dataclass
class SegEvaluator:
    """Accumulates the histograms image by image; ``summary()`` gives the metrics (fractions in [0, 1])."""

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    class_names: Optional[Sequence[str]] = None
    area_intersect: Tensor = field(init=False)
    area_union: Tensor = field(init=False)
    area_pred: Tensor = field(init=False)
    area_label: Tensor = field(init=False)
    num_images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        z = torch.zeros(self.num_classes, dtype=torch.float64)
        self.area_intersect, self.area_union, self.area_pred, self.area_label = z.clone(), z.clone(), z.clone(), z.clone()

    def update(self, pred: Tensor, label: Tensor) -> None:
        """pred, label: (H, W) or (B, H, W) integer maps (label already reduced: 255 = ignore)."""
        ai, au, ap, al = intersect_and_union(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index)
        self.area_intersect += ai
        self.area_union += au
        self.area_pred += ap
        self.area_label += al
        self.num_images += 1 if pred.dim() == 2 else pred.shape[0]

    def merge_(self, other_areas: Tensor) -> None:
        """Replace the histograms with a (4, K) stack (e.g. after an all-reduce across processes)."""
        self.area_intersect, self.area_union, self.area_pred, self.area_label = (t.clone() for t in other_areas)

    def areas(self) -> Tensor:
        return torch.stack([self.area_intersect, self.area_union, self.area_pred, self.area_label])

    def summary(self) -> Dict[str, object]:
        """dict(mIoU, mAcc, aAcc, IoU: list per class (NaN where undefined), Acc: list, classes: names)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = (self.area_intersect / self.area_union).numpy()
            acc = (self.area_intersect / self.area_label).numpy()
        total = float(self.area_label.sum())
        a_acc = float(self.area_intersect.sum()) / total if total > 0 else float("nan")
        names: List[str] = list(self.class_names) if self.class_names is not None else \
            [str(i) for i in range(self.num_classes)]
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "aAcc": a_acc,
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
            "classes": names[: self.num_classes] + [str(i) for i in range(len(names), self.num_classes)],
            "num_images": self.num_images,
        }
