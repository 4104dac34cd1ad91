"""COCO evaluation wrapper: its numbers must be the COCO API's own numbers."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from elsa.dense.detection.evaluation import CocoEvaluator, evaluate_coco, load_coco, to_coco_results  # noqa: E402

H, W = 60, 80


def _gt_file(tmp_path):
    """3 images, 2 categories with non-contiguous ids (3 and 7), rectangles of varied sizes, polygon masks."""
    rects = {1: [(3, 5, 20, 30), (40, 10, 70, 50)], 2: [(10, 10, 50, 40)], 3: [(0, 0, 12, 9), (30, 30, 79, 59)]}
    cats = {1: [3, 7], 2: [7], 3: [3, 3]}
    images, anns = [], []
    k = 1
    for img_id, boxes in rects.items():
        images.append({"id": img_id, "file_name": f"{img_id}.png", "width": W, "height": H})
        for (x0, y0, x1, y1), c in zip(boxes, cats[img_id]):
            anns.append({"id": k, "image_id": img_id, "category_id": c, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
            k += 1
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    return path, rects, cats


def _pred(boxes, labels, scores):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), 1, H, W)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, 0, y0:y1, x0:x1] = 0.9
    return {"boxes": boxes, "labels": torch.tensor(labels), "scores": torch.tensor(scores), "masks": masks}


def test_ground_truth_as_predictions_gives_ap_one(tmp_path):
    path, rects, cats = _gt_file(tmp_path)
    ev = CocoEvaluator(load_coco(path), label_to_cat=[3, 7])
    for img_id, boxes in rects.items():
        labels = [1 if c == 3 else 2 for c in cats[img_id]]
        ev.update([img_id], [_pred(boxes, labels, [1.0] * len(boxes))])
    m = ev.summarize()
    for iou_type in ("bbox", "segm"):
        assert m[iou_type]["AP"] == pytest.approx(1.0)
        assert m[iou_type]["AP50"] == pytest.approx(1.0)
        assert m[iou_type]["AP75"] == pytest.approx(1.0)
    assert "Average Precision" in m["bbox"]["table"]


def test_wrapper_equals_coco_api_on_imperfect_predictions(tmp_path):
    path, rects, cats = _gt_file(tmp_path)
    # shifted boxes (IoU between 0.5 and 0.95), a wrong class, a duplicate and a false positive, mixed scores
    preds = {
        1: _pred([(4, 6, 21, 31), (42, 12, 72, 52), (0, 40, 10, 58)], [1, 2, 2], [0.9, 0.6, 0.7]),
        2: _pred([(12, 8, 52, 44), (10, 10, 50, 40)], [2, 1], [0.8, 0.95]),
        3: _pred([(0, 0, 13, 10), (33, 27, 79, 59), (31, 31, 78, 58)], [1, 1, 1], [0.5, 0.85, 0.3]),
    }
    ev = CocoEvaluator(load_coco(path), label_to_cat=[3, 7])
    for img_id, p in preds.items():
        ev.update([img_id], [p])
    ours = ev.summarize()

    # the same detections written out by hand for the COCO API
    records = []
    for img_id, p in preds.items():
        for b, l, s, m in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), p["masks"]):
            rle = mask_utils.encode(np.asfortranarray((m[0] > 0.5).numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            records.append({"image_id": img_id, "category_id": [3, 7][l - 1], "score": s,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "segmentation": rle})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        for iou_type in ("bbox", "segm"):
            res = records if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in records]
            e = COCOeval(gt, gt.loadRes(res), iou_type)
            e.evaluate(), e.accumulate(), e.summarize()
            ref = e.stats
            got = [ours[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
            np.testing.assert_allclose(got, ref[:6], atol=1e-12)
            assert 0.2 < ref[0] < 0.95  # a non-trivial case: neither perfect nor zero
    # hand check: at IoU 0.5 class 'b' ranks a false positive (image 1, score 0.7) above a true positive (0.6),
    # and class 'a' has a false positive on image 2's 'b' object -> AP50 < 1
    assert ours["bbox"]["AP50"] < 1.0


def test_to_coco_results_maps_labels_and_boxes():
    p = _pred([(1, 2, 11, 22)], [2], [0.5])
    (r,) = to_coco_results(5, p, label_to_cat=[3, 7])
    assert r["category_id"] == 7 and r["image_id"] == 5
    assert r["bbox"] == pytest.approx([1, 2, 10, 20])
    assert mask_utils.area(r["segmentation"]) == 10 * 20


def test_no_detections_is_zero_not_crash(tmp_path):
    path, _, _ = _gt_file(tmp_path)
    m = evaluate_coco(load_coco(path), [])
    assert m["bbox"]["AP"] == 0.0 and m["segm"]["AP"] == 0.0
