"""COCO-format instance data for detection: reading, cleaning bad annotations (as mmdetection 2.11's CocoDataset
does), and the official ELSA-Swin training augmentation.

Cleaning (counted in ``CocoInstances.stats``, never a crash), following mmdet's ``_parse_ann_info`` / ``_filter_imgs``:
- images whose file is missing: skipped with a warning (mmdet would crash);
- annotations: crowd (``iscrowd=1``) and unknown categories are not used for training; boxes with no overlap with
  the image, or with w or h < 1 or area <= 0, are dropped; boxes are NOT clipped here (mmdet clips them when it
  resizes, as ``TrainTransform`` does); polygons with fewer than 3 points or zero area are dropped, and an instance
  left without any mask part keeps its box with an empty mask;
- training keeps an image if it has at least one annotation of a known category, crowd or degenerate ones included
  (mmdet's ``filter_empty_gt``; such images train as all-background), and if its shorter side is >= ``min_size``
  (32). Evaluation keeps every image.
"""
from __future__ import annotations

import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...data.folder import SAMPLE_ERRORS, DatasetError
from .annotations import check_annotation, check_image, is_int, load_coco_json, summary_lines
from ...data.image import open_rgb
from torch import Tensor

_logger = logging.getLogger(__name__)

Target = Dict[str, Tensor]


def coco_paths(root: Union[str, os.PathLike], split: str) -> Tuple[Path, Path]:
    """(annotation json, image folder) of the COCO 2017 layout: ROOT/annotations/instances_{split}2017.json and
    ROOT/{split}2017/ (falls back to instances_{split}.json and ROOT/{split}/ when those exist)."""
    root = Path(root)
    for ann, img in ((root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
                     (root / "annotations" / f"instances_{split}.json", root / split)):
        if ann.is_file():
            return ann, img
    raise FileNotFoundError(f"--data {root}: expected {root}/annotations/instances_{split}2017.json "
                            f"(and images in {root}/{split}2017/)")


def _polygon_area(poly: Sequence[float]) -> float:
    xs, ys = np.asarray(poly[0::2], dtype=np.float64), np.asarray(poly[1::2], dtype=np.float64)
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances as (image (3, H, W) float in [0, 1], target) pairs for torchvision detectors.

    target: boxes (N, 4) xyxy float, labels (N,) int64 in 1..K (contiguous, categories sorted by id), masks
    (N, H, W) uint8, image_id (int64), orig_size (2,). ``transforms(image, target) -> (image, target)``.
    ``train=True`` drops crowd annotations and skips images with no annotation of a known category or a side
    < ``min_size`` (see the module docstring).
    """

    def __init__(self, ann_file: Union[str, os.PathLike], img_dir: Union[str, os.PathLike], train: bool,
                 transforms: Optional[Callable] = None, filter_empty: Optional[bool] = None,
                 check_files: bool = True, min_size: int = 32) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        data = load_coco_json(self.ann_file)
        self.train = train
        self.transforms = transforms
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        self.classes = [c["name"] for c in self.categories]
        self.cat_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.stats: Counter = Counter()
        self.examples: Dict[str, object] = {}  # reason -> first record left out for it (named in the log)
        images: Dict[int, dict] = {}
        for info in data["images"]:
            self.stats["images_total"] += 1
            if not check_image(info):
                self._drop("images_bad_entry", info)
            elif info["id"] in images:
                self._drop("images_duplicate_id", info)
            else:
                images[info["id"]] = info
        anns_by_image: Dict[int, List[dict]] = {}
        self.gt_annotations: List[dict] = []  # the well-formed records: the ground truth of evaluate()
        for a in data["annotations"]:
            reason, checked = check_annotation(a, images)
            if reason is not None:
                self.stats["anns_total"] += 1
                self._drop(reason, a)
                continue
            anns_by_image.setdefault(checked["image_id"], []).append(checked)
            self.gt_annotations.append(checked)
        filter_empty = train if filter_empty is None else filter_empty
        self.items: List[Tuple[dict, List[dict]]] = []
        for info in images.values():
            if check_files and not (self.img_dir / info["file_name"]).is_file():
                _logger.warning("image file missing, skipped: %s", self.img_dir / info["file_name"])
                self.stats["images_missing"] += 1
                continue
            raw = anns_by_image.get(info["id"], [])
            if filter_empty and not any(self._label(a) for a in raw):
                self.stats["images_empty_skipped"] += 1
                continue
            if train and min(info["width"], info["height"]) < min_size:
                self.stats["images_too_small_skipped"] += 1
                continue
            anns = self._clean(info, raw)
            if not anns:
                self.stats["images_without_instances"] += 1
            self.items.append((info, anns))
        self.images = [info for info, _ in self.items]
        for line in summary_lines(self.stats, self.examples, self.ann_file):
            _logger.warning(line)
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()))
        if not self.items:  # stop here, with the reasons, rather than start a run that cannot make one step
            raise DatasetError(f"ann_file {self.ann_file}: no usable image ({counts or 'no images listed'})")
        _logger.info("%s: %d images used; %s", self.ann_file.name, len(self.items), counts)

    def _drop(self, reason: str, record: object) -> None:
        self.stats[reason] += 1
        self.examples.setdefault(reason, record)

    def _label(self, a: dict) -> int:
        """Label 1..K of a checked record, 0 for a category id not in ``categories``."""
        cid = a.get("category_id")
        return self.cat_to_label.get(cid, 0) if is_int(cid) else 0

    def _clean(self, info: dict, anns: List[dict]) -> List[dict]:
        """mmdet's geometric rules on well-formed records (see the module docstring)."""
        w, h = float(info["width"]), float(info["height"])
        out = []
        for a in anns:
            self.stats["anns_total"] += 1
            if a.get("ignore", False):  # mmdet skips these first
                self._drop("anns_ignore_flag", a)
                continue
            if a["iscrowd"]:
                self.stats["anns_crowd"] += 1
                if self.train:
                    continue
            label = self._label(a)
            if not label:
                self.stats["anns_bad_category"] += 1
                continue
            x, y, bw, bh = a["bbox"]
            if max(0.0, min(x + bw, w) - max(x, 0.0)) * max(0.0, min(y + bh, h) - max(y, 0.0)) == 0:
                self.stats["anns_outside_image"] += 1
                continue
            if bw < 1 or bh < 1 or a.get("area", bw * bh) <= 0:
                self.stats["anns_degenerate_box"] += 1
                continue
            seg = a["segmentation"]
            if isinstance(seg, list):
                polys = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0 and _polygon_area(p) > 0]
                if len(polys) < len(seg):
                    self.stats["polygons_degenerate"] += len(seg) - len(polys)
                seg = polys or None
            if seg is None:
                self.stats["anns_no_valid_mask"] += 1  # kept with an empty mask, as its box is valid
            out.append({"box": [x, y, x + bw, y + bh], "label": label, "segmentation": seg,
                        "iscrowd": a["iscrowd"]})
        return out

    def coco_gt(self):
        """A pycocotools COCO object of the well-formed records, so evaluation never parses a malformed one. A record
        without a usable mask part (pycocotools would fail on it in "segm") gets its box as its mask."""
        from .evaluation import coco_from_dict

        anns = []
        for i, a in enumerate(self.gt_annotations):
            x, y, bw, bh = a["bbox"]
            seg = a["segmentation"]
            if isinstance(seg, list):
                seg = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0] or None
            if seg is None:
                seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            anns.append(dict(a, id=a["id"] if is_int(a.get("id")) else -(i + 1), segmentation=seg,
                             area=float(a.get("area", bw * bh))))
        return coco_from_dict({"images": self.images, "annotations": anns, "categories": self.categories})

    def __len__(self) -> int:
        return len(self.items)

    def image_info(self, index: int) -> dict:
        return self.items[index][0]

    def _decode_masks(self, anns: List[dict], h: int, w: int) -> Tensor:
        from pycocotools import mask as mask_utils

        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for i, a in enumerate(anns):
            seg = a["segmentation"]
            if seg is None:
                continue  # no valid mask part: empty mask
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            m = mask_utils.decode(rle)  # an RLE has the JSON's image size (checked); the file may differ
            masks[i] = m if m.shape == (h, w) else F.interpolate(
                torch.from_numpy(m)[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(torch.uint8).numpy()
        return torch.from_numpy(masks)

    def filename(self, index: int) -> str:
        """The image file of sample ``index`` (named in warnings about unreadable files)."""
        return str(self.img_dir / self.items[index][0]["file_name"])

    def __getitem__(self, index: int) -> Tuple[Tensor, Target]:
        info, anns = self.items[index]
        # An unreadable file raises (OSError and kin): training wraps the set in elsa.data.SkipUnreadable (replaced,
        # warned once, counted), evaluation leaves the image out and counts it (ImagesOrNone).
        img = np.asarray(open_rgb(self.img_dir / info["file_name"]))
        h, w = img.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            self.stats["images_size_mismatch"] += 1
        image = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255)
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # unclipped, as mmdet
        target = {"boxes": boxes, "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
                  "masks": self._decode_masks(anns, h, w), "image_id": torch.tensor(int(info["id"])),
                  "orig_size": torch.tensor([h, w])}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ------------------------------------------------------------------------------------------------ transforms
def _resize(image: Tensor, target: Target, short: int, max_size: int) -> Tuple[Tensor, Target]:
    """Keep-ratio resize as mmcv.imrescale: scale = min(short / min(h, w), max_size / max(h, w)), sides rounded
    half-up; boxes scaled by (new_w / w, new_h / h) and clipped to the new image (mmdet Resize, bbox_clip_border)."""
    h, w = image.shape[-2:]
    scale = min(short / min(h, w), max_size / max(h, w))
    nh, nw = max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    target = dict(target)
    if len(target["boxes"]):
        b = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        b[:, 0::2] = b[:, 0::2].clamp(0, nw)
        b[:, 1::2] = b[:, 1::2].clamp(0, nh)
        target["boxes"] = b
    m = target["masks"]
    target["masks"] = (F.interpolate(m[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
                       if len(m) else m.new_zeros((0, nh, nw)))
    return image, target


def _flip(image: Tensor, target: Target) -> Tuple[Tensor, Target]:
    w = image.shape[-1]
    target = dict(target)
    b = target["boxes"].clone()
    b[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    target["boxes"] = b
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def _crop(image: Tensor, target: Target, crop_min: int, crop_max: int, rng: random.Random) -> Tuple[Tensor, Target]:
    """mmdet RandomCrop(crop_type='absolute_range', allow_negative_crop=True): crop side in
    [min(side, crop_min), min(side, crop_max)], boxes shifted and clipped, empty boxes dropped."""
    h, w = image.shape[-2:]
    ch = rng.randint(min(h, crop_min), min(h, crop_max))
    cw = rng.randint(min(w, crop_min), min(w, crop_max))
    y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
    target = dict(target)
    b = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    b[:, 0::2].clamp_(0, cw)
    b[:, 1::2].clamp_(0, ch)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    target["boxes"], target["labels"] = b[keep], target["labels"][keep]
    target["masks"] = target["masks"][keep][:, y0:y0 + ch, x0:x0 + cw]
    return image[:, y0:y0 + ch, x0:x0 + cw], target


class TrainTransform:
    """The official train pipeline: flip 0.5, then with equal chance either (a) resize the short side to one of
    ``scales`` (long side <= max_size) or (b) resize to one of ``crop_prescales``, random crop with sides in
    ``crop_size``, and resize to one of ``scales`` (mmdet AutoAugment of the DETR / Sparse R-CNN recipe)."""

    def __init__(self, scales: Sequence[int], max_size: int, flip_prob: float = 0.5, detr_crop: bool = True,
                 crop_prescales: Sequence[int] = (400, 500, 600), crop_size: Tuple[int, int] = (384, 600),
                 seed: Optional[int] = None) -> None:
        self.scales, self.max_size, self.flip_prob = list(scales), max_size, flip_prob
        self.detr_crop, self.crop_prescales, self.crop_size = detr_crop, list(crop_prescales), tuple(crop_size)
        self.rng = random.Random(seed)  # its own stream; each loader worker reseeds it (elsa.engine.seed_worker)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, image: Tensor, target: Target) -> Tuple[Tensor, Target]:
        rng = self.rng
        if rng.random() < self.flip_prob:
            image, target = _flip(image, target)
        if self.detr_crop and rng.random() < 0.5:
            image, target = _resize(image, target, rng.choice(self.crop_prescales), self.max_size)
            image, target = _crop(image, target, *self.crop_size, rng=rng)
        return _resize(image, target, rng.choice(self.scales), self.max_size)


class AspectRatioBatchSampler(torch.utils.data.Sampler):
    """Batches of images that are all landscape (w > h) or all portrait, as mmdetection's (Distributed)GroupSampler,
    so padding a batch to its largest image wastes little. Each epoch shuffles within the two groups, cuts
    batches, shuffles the batches and gives rank r every world-th batch (same seed + epoch on every rank).
    Call ``set_epoch`` each epoch. The last incomplete batch of a group is kept."""

    def __init__(self, dataset: "CocoInstances", batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups: Dict[bool, List[int]] = {True: [], False: []}
        for i in range(len(dataset)):
            info = dataset.image_info(i)
            self.groups[info["width"] > info["height"]].append(i)
        self.batch_size, self.rank, self.world, self.seed, self.epoch = batch_size, rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> List[List[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for idx in self.groups.values():
            perm = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
            batches += [perm[k:k + self.batch_size] for k in range(0, len(perm), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
        n = -(-len(batches) // self.world) * self.world  # equal count per rank: repeat a few batches
        batches = (batches * (n // max(len(batches), 1) + 1))[:n] if batches else []
        return batches[self.rank::self.world]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n = sum(-(-len(v) // self.batch_size) for v in self.groups.values())
        return -(-n // self.world)


def collate(batch: List[Optional[Tuple[Tensor, Target]]]) -> Tuple[List[Tensor], List[Target]]:
    """Detection batches are lists (images differ in size; the model pads them). ``None`` items (unreadable images
    in evaluation, ``ImagesOrNone``) are left out."""
    good = [b for b in batch if b is not None]
    return [b[0] for b in good], [b[1] for b in good]


def collate_skip(batch: List[Tuple[Tensor, Target, int]]) -> Tuple[List[Tensor], List[Target], int]:
    """Training batches of ``SkipUnreadable(CocoInstances)``: (images, targets, unreadable files met)."""
    return [b[0] for b in batch], [b[1] for b in batch], sum(b[2] for b in batch)


class ImagesOrNone(torch.utils.data.Dataset):
    """Evaluation view of a dataset: an unreadable image gives ``None`` (left out of the batch by ``collate``),
    is warned about and counted in ``unreadable``, instead of being replaced by another image (which would be
    evaluated twice). Used in the main process (num_workers=0), where the count is read back."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset, self.unreadable = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except SAMPLE_ERRORS as err:
            self.unreadable += 1
            _logger.warning("left out of the evaluation, unreadable: %s (%s)", index, err)
            return None


def build_datasets(data: Union[str, os.PathLike], recipe, splits: Sequence[str] = ("train", "val"),
                   ann_files: Optional[Dict[str, str]] = None,
                   img_dirs: Optional[Dict[str, str]] = None) -> Dict[str, CocoInstances]:
    """Train/val datasets under the COCO layout of ``data`` (per-split paths may be overridden)."""
    out = {}
    for split in splits:
        ann = (ann_files or {}).get(split)
        img = (img_dirs or {}).get(split)
        if ann is None or img is None:
            dann, dimg = coco_paths(data, split)
            ann, img = ann or dann, img or dimg
        train = split == "train"
        tf = TrainTransform(recipe.train_scales, recipe.max_size, recipe.flip_prob, recipe.detr_crop,
                            recipe.crop_prescales, recipe.crop_size, seed=torch.initial_seed() % 2 ** 32) if train else None
        out[split] = CocoInstances(ann, img, train=train, transforms=tf)
    return out
