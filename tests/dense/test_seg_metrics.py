"""mIoU / aAcc / mAcc against values computed by hand (ignore pixels, absent classes, predicted-only classes)."""
import math

import numpy as np
import pytest
import torch

from elsa.dense.segmentation.data import reduce_zero_label
from elsa.dense.segmentation.metrics import SegEvaluator, intersect_and_union


def test_metrics_match_hand_computation():
    # Image 1 comes as a raw ADE map: 0 = "other" -> ignored; k -> k - 1.
    raw1 = np.array([[1, 1, 2], [2, 0, 3]], np.uint8)
    label1 = torch.from_numpy(reduce_zero_label(raw1)).long()
    assert label1.tolist() == [[0, 0, 1], [1, 255, 2]]
    pred1 = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the prediction 2 at the ignored pixel must not count
    label2 = torch.tensor([[1, 1, 1]])
    pred2 = torch.tensor([[1, 2, 4]])              # class 4 predicted but in no ground truth
    ev = SegEvaluator(num_classes=5)               # class 3 in neither -> NaN, left out of the means
    ev.update(pred1, label1)
    ev.update(pred2, label2)
    # By hand: I = [1,3,0,0,0], P = [2,4,1,0,1], L = [2,5,1,0,0], U = P + L - I = [3,6,2,0,1]
    assert ev.area_intersect.tolist() == [1, 3, 0, 0, 0]
    assert ev.area_union.tolist() == [3, 6, 2, 0, 1]
    assert ev.area_label.tolist() == [2, 5, 1, 0, 0]
    s = ev.summary()
    iou = s["IoU"]
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(1 / 2) and iou[2] == 0.0
    assert math.isnan(iou[3]) and iou[4] == 0.0
    assert s["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 0 + 0) / 4)        # 0.2083
    assert s["mAcc"] == pytest.approx((1 / 2 + 3 / 5 + 0) / 3)            # classes 3, 4: no GT -> NaN
    assert s["aAcc"] == pytest.approx(4 / 8)
    assert s["num_images"] == 2


def test_intersect_and_union_checks_shapes_and_ignores():
    with pytest.raises(ValueError, match="same shape"):
        intersect_and_union(torch.zeros(2, 2), torch.zeros(2, 3), 3)
    label = torch.full((4, 4), 255)
    ai, au, ap, al = intersect_and_union(torch.zeros(4, 4, dtype=torch.long), label, 3)
    assert au.sum() == 0 and al.sum() == 0  # all ignored: nothing counted
    ev = SegEvaluator(3)
    ev.update(torch.zeros(4, 4, dtype=torch.long), label)
    assert math.isnan(ev.summary()["mIoU"])
