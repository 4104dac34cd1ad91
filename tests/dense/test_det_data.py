"""COCO-format reading: bad annotations cleaned as mmdetection does (with counts), augmentation keeps boxes, masks
and image consistent, synthetic generator writes valid COCO."""
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
from PIL import Image  # noqa: E402

from elsa.dense.detection.data import CocoInstances, TrainTransform, _crop, _flip, _resize, coco_paths  # noqa: E402
from synthetic_coco import make_synthetic_coco  # noqa: E402


def _write_bad_dataset(tmp_path):
    img_dir = tmp_path / "train2017"
    img_dir.mkdir()
    for i in (1, 2, 3, 4):
        Image.fromarray(np.full((50, 60, 3), 100, np.uint8)).save(img_dir / f"{i}.png")
    Image.fromarray(np.full((20, 60, 3), 100, np.uint8)).save(img_dir / "6.png")
    images = [{"id": i, "file_name": f"{i}.png", "width": 60, "height": 50} for i in (1, 2, 3, 4, 5)]  # 5: missing
    images.append({"id": 6, "file_name": "6.png", "width": 60, "height": 20})  # shorter side < 32

    def ann(k, img, bbox, seg=None, cat=1, crowd=0, area=None):
        x, y, w, h = bbox
        return {"id": k, "image_id": img, "category_id": cat, "iscrowd": crowd, "bbox": bbox,
                "area": w * h if area is None else area,
                "segmentation": seg if seg is not None else [[x, y, x + w, y, x + w, y + h, x, y + h]]}

    anns = [
        ann(1, 1, [5, 5, 10, 10]),                                   # good
        ann(2, 1, [50, 40, 20, 20], seg=[[50, 40, 59, 40, 59, 49, 50, 49]]),  # crosses the border: kept unclipped
        ann(3, 1, [5, 5, 0.5, 10]),                                  # w < 1: degenerate box
        ann(4, 1, [70, 10, 5, 5]),                                   # entirely outside the image
        ann(5, 1, [5, 5, 10, 10], seg=[[5, 5, 15, 5]]),              # polygon of 2 points only -> no mask
        ann(6, 1, [5, 5, 10, 10], seg=[[5, 5, 10, 5, 15, 5], [5, 5, 15, 5, 15, 15, 5, 15]]),  # 1 collinear of 2
        ann(7, 1, [5, 5, 10, 10], cat=99),                          # unknown category
        ann(8, 2, [5, 5, 10, 10], crowd=1),                          # crowd only -> image 2 empty in training
        ann(9, 3, [5, 5, 0, 0]),                                     # degenerate only -> image 3 empty
        ann(10, 5, [5, 5, 10, 10]),                                  # on the missing image
        ann(11, 1, [20, 20, 10, 10], area=0),                        # area 0: degenerate box
        ann(12, 6, [5, 5, 10, 10]),                                  # good, on the too-small image
    ]                                                                # image 4: no annotations at all
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    path = ann_dir / "instances_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}, {"id": 4, "name": "other"}]}))
    return path, img_dir


def test_bad_annotations_are_dropped_and_counted(tmp_path, caplog):
    """mmdet 2.11 CocoDataset rules: _parse_ann_info drops boxes without overlap, w or h < 1, area <= 0, unknown
    categories, keeps crowd boxes out of the targets, never clips; _filter_imgs keeps an image that has any
    annotation of a known category (crowd-only or degenerate-only included) and a shorter side >= 32."""
    path, img_dir = _write_bad_dataset(tmp_path)
    ds = CocoInstances(path, img_dir, train=True)
    s = ds.stats
    assert s["images_total"] == 6
    assert s["images_missing"] == 1
    assert s["images_empty_skipped"] == 1  # image 4 (no annotations at all)
    assert s["images_too_small_skipped"] == 1  # image 6 (20 px high)
    assert s["images_without_instances"] == 2  # images 2 (crowd only) and 3 (degenerate only) stay, all background
    assert s["anns_degenerate_box"] == 2  # ids 3, 11
    assert s["anns_outside_image"] == 2  # ids 4 and 9 (0 x 0: mmdet tests the overlap first)
    assert s["anns_bad_category"] == 1
    assert s["anns_crowd"] == 1
    assert s["anns_no_valid_mask"] == 1
    assert s["polygons_degenerate"] == 2  # the 2-point polygon and the collinear one
    assert "missing" in caplog.text
    assert [info["id"] for info, _ in ds.items] == [1, 2, 3]
    image, t = ds[0]
    assert image.shape == (3, 50, 60) and 0 <= image.min() and image.max() <= 1
    assert t["labels"].tolist() == [1, 1, 1, 1]  # ids 1, 2, 5 (box kept, empty mask) and 6 survive
    assert t["boxes"][1].tolist() == [50, 40, 70, 60]  # crosses the border: not clipped (mmdet clips on resize)
    assert t["masks"].shape == (4, 50, 60) and t["masks"].dtype == torch.uint8
    assert t["masks"][0].sum() > 0 and t["masks"][2].sum() == 0 and t["masks"][3].sum() > 0
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["masks"].shape == (0, 50, 60)
    resized = _resize(image, t, 100, 1000)[1]["boxes"]  # the resize clips to the new image, as mmdet's Resize
    assert resized[1].tolist() == [100, 80, 120, 100] and resized[0].tolist() == [10, 10, 30, 30]
    # evaluation keeps every image, small or empty (they count for false positives)
    assert len(CocoInstances(path, img_dir, train=False)) == 5


def test_missing_layout_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        coco_paths(tmp_path, "train")


def _target():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:40, 30:50] = 1
    return {"boxes": torch.tensor([[10.0, 5, 30, 15], [30, 20, 50, 40]]), "labels": torch.tensor([1, 2]),
            "masks": masks}


def _mask_box(m):
    ys, xs = torch.where(m > 0)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_resize_crop_keep_boxes_on_masks():
    image = torch.rand(3, 40, 50)
    im, t = _flip(image, _target())
    assert torch.equal(im, image.flip(-1))
    assert t["boxes"][0].tolist() == [20, 5, 40, 15] and _mask_box(t["masks"][0]) == [20, 5, 40, 15]
    im, t = _resize(image, _target(), short=80, max_size=1000)  # x2
    assert im.shape == (3, 80, 100)
    assert t["boxes"][1].tolist() == [60, 40, 100, 80] and _mask_box(t["masks"][1]) == [60, 40, 100, 80]
    im, t = _resize(image, _target(), short=80, max_size=75)  # long side caps: scale 1.5
    assert im.shape == (3, 60, 75)
    rng = random.Random(3)
    for _ in range(20):
        im, t = _crop(image, _target(), 20, 30, rng=rng)
        assert 20 <= im.shape[1] <= 30 and 20 <= im.shape[2] <= 30
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        for b, m in zip(t["boxes"], t["masks"]):
            assert (b[2:] > b[:2]).all() and _mask_box(m) == b.tolist()


def test_train_transform_short_side_in_scales():
    random.seed(0)
    tf = TrainTransform(scales=(48, 64), max_size=200, detr_crop=True, crop_prescales=(40,), crop_size=(20, 30))
    for _ in range(10):
        im, t = tf(torch.rand(3, 40, 50), _target())
        assert min(im.shape[1:]) in (48, 64)
        assert t["masks"].shape[1:] == im.shape[1:]


def test_synthetic_coco_is_valid_coco(tmp_path):
    from elsa.dense.detection.evaluation import load_coco

    paths = make_synthetic_coco(tmp_path, num_train=6, num_val=3, seed=1)
    coco = load_coco(paths["train"])
    assert len(coco.getImgIds()) == 6 and sorted(coco.getCatIds()) == [1, 2]
    ds = CocoInstances(*coco_paths(tmp_path, "val"), train=False)
    assert len(ds) == 3 and ds.classes == ["box", "disc"]
    _, t = ds[0]
    for b, m in zip(t["boxes"], t["masks"]):  # the polygon mask fills most of its box, and stays inside it
        x0, y0, x1, y1 = _mask_box(m)
        assert x0 >= b[0] - 1 and y0 >= b[1] - 1 and x1 <= b[2] + 1 and y1 <= b[3] + 1
        assert m.sum() > 0.5 * (b[2] - b[0]) * (b[3] - b[1])


def test_aspect_ratio_batches_are_homogeneous_and_sharded():
    from elsa.dense.detection.data import AspectRatioBatchSampler

    class Fake:
        sizes = [(100, 50), (50, 100), (80, 60), (60, 80), (90, 30), (30, 90), (70, 20)]

        def __len__(self):
            return len(self.sizes)

        def image_info(self, i):
            return {"width": self.sizes[i][0], "height": self.sizes[i][1]}

    ds = Fake()
    s = AspectRatioBatchSampler(ds, batch_size=2, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 4  # 4 landscape -> 2 batches, 3 portrait -> 2 batches
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len({ds.sizes[i][0] > ds.sizes[i][1] for i in b}) == 1
    s.set_epoch(1)
    assert sorted(i for b in s for i in b) == list(range(7))
    r0 = AspectRatioBatchSampler(ds, 2, rank=0, world_size=2, seed=1)
    r1 = AspectRatioBatchSampler(ds, 2, rank=1, world_size=2, seed=1)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(r0) == 2
    assert sorted(i for b in b0 + b1 for i in b) == list(range(7))  # together: every image once


def test_unreadable_image_is_replaced_in_training_and_left_out_in_evaluation(tmp_path, caplog):
    """The one unreadable-sample policy (elsa.data.SkipUnreadable) in detection training, counted per batch;
    evaluation leaves the image out rather than evaluating a neighbour twice."""
    from elsa.data.folder import SkipUnreadable
    from elsa.dense.detection.data import ImagesOrNone, collate, collate_skip

    path, img_dir = _write_bad_dataset(tmp_path)
    (img_dir / "2.png").write_bytes(b"\x89PNG not a png")
    ds = CocoInstances(path, img_dir, train=True)
    bad = next(i for i in range(len(ds)) if ds.filename(i).endswith("2.png"))
    train = SkipUnreadable(ds)
    with caplog.at_level("WARNING"):
        batch = collate_skip([train[bad], train[bad], train[(bad + 1) % len(ds)]])
    images, targets, skipped = batch
    assert skipped == 2 and len(images) == 3
    assert int(targets[0]["image_id"]) != 2  # replaced by the next readable image
    assert sum("2.png" in r.getMessage() for r in caplog.records) == 1  # warned once per file
    evaluation = ImagesOrNone(ds)
    images, targets = collate([evaluation[i] for i in range(len(ds))])
    assert evaluation.unreadable == 1 and len(images) == len(ds) - 1
    assert 2 not in [int(t["image_id"]) for t in targets]


def test_train_transform_draws_from_its_own_seeded_stream():
    """No global random in the detection transforms: the same seed gives the same augmentation whatever the
    global RNG state, and reseeding (what each loader worker does) restarts the stream."""
    image = torch.rand(3, 60, 80)
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 60, 80, dtype=torch.uint8)}
    outs = []
    for global_seed in (0, 1):
        random.seed(global_seed)
        tf = TrainTransform([32, 40, 48], 96, crop_prescales=(40, 48), crop_size=(20, 40), seed=7)
        outs.append([tf(image, target)[0].shape for _ in range(8)])
    assert outs[0] == outs[1]
    tf.reseed(7)
    assert [tf(image, target)[0].shape for _ in range(8)] == outs[0]
    assert len(set(outs[0])) > 1  # it does draw


@pytest.mark.parametrize("case", ["no images", "all files missing"])
def test_a_dataset_with_no_usable_image_stops_with_one_line(tmp_path, case):
    """Before, `elsa det train` looped forever around a loader that yielded nothing. (An image whose boxes are all
    degenerate is not unusable: mmdet keeps it as background, and so do we.)"""
    import subprocess
    import sys

    img_dir = tmp_path / "train2017"
    img_dir.mkdir()
    images = [] if case == "no images" else [{"id": 1, "file_name": "1.png", "width": 60, "height": 50}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 10, 10], "area": 100,
             "segmentation": [[5, 5, 15, 5, 15, 15]]}] if images else []
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="no usable image"):
        CocoInstances(ann, img_dir, train=True)
    from synthetic_coco import tiny_recipe_file

    done = subprocess.run([sys.executable, "-m", "elsa.cli.det", "train", "--recipe", tiny_recipe_file(tmp_path),
                           "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--iters", "5",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no usable image" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "last.pth").exists()
