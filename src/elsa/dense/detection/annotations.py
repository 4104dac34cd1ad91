"""Reading a COCO instances file and checking each record's structure before anything uses it.

mmdetection's ``CocoDataset._parse_ann_info`` assumes well-formed records (``x1, y1, w, h = ann['bbox']``, a numeric
``area``, decodable masks) and crashes, or worse trains on NaN, when one is not. Here every record is checked when
the dataset is built: a malformed one gets a reason (one of ``REASONS``) and is left out; the geometric rules of
mmdet (overlap with the image, w/h >= 1, area > 0) are applied afterwards by ``CocoInstances``.

An RLE is checked in Python before pycocotools sees it: its C decoder writes ``sum(counts)`` pixels into an
``h * w`` buffer without a bound check, so a wrong ``counts`` corrupts memory instead of raising.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ...data.folder import DatasetError

# why a record was left out (counted in CocoInstances.stats under these keys)
REASONS = {
    "anns_not_an_object": "not a JSON object",
    "anns_bad_image_id": "image_id missing or not listed in images",
    "anns_bad_category_id": "category_id missing or not an integer",
    "anns_bad_bbox": "bbox is not 4 finite numbers",
    "anns_bad_area": "area is not a finite number",
    "anns_bad_iscrowd": "iscrowd is not 0 or 1",
    "anns_bad_segmentation": "segmentation is neither polygons nor an RLE of the image's size",
    "anns_ignore_flag": "marked ignore (mmdet skips these)",
    "images_bad_entry": "image record without an id, a file_name or a positive integer width/height",
    "images_duplicate_id": "image id listed twice",
}


def load_coco_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed file, with the three lists COCO instances need; a one-line DatasetError naming the file if not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if path.stat().st_size == 0:
        raise DatasetError(f"annotation file {path} is empty")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"annotation file {path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DatasetError(f"annotation file {path}: cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path}: expected a JSON object with images, annotations and categories,"
                           f" got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file {path}: not COCO instances format (no {key!r} list)")
    cats = data["categories"]
    bad = [c for c in cats if not (isinstance(c, dict) and is_int(c.get("id")) and isinstance(c.get("name"), str))]
    if bad:
        raise DatasetError(f"annotation file {path}: {len(bad)} categor{'y' if len(bad) == 1 else 'ies'} without an "
                           f"integer id and a name (first: {str(bad[0])[:80]})")
    if not cats:
        raise DatasetError(f"annotation file {path}: no categories")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"annotation file {path}: category ids are not unique")
    return data


def is_number(v: Any) -> bool:
    """A finite real number (not a bool, which JSON's true/false would give)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_image(info: Any) -> bool:
    """An image record usable at all: id, file_name and positive integer width/height."""
    return (isinstance(info, dict) and is_int(info.get("id")) and isinstance(info.get("file_name"), str)
            and bool(info["file_name"]) and is_int(info.get("width")) and is_int(info.get("height"))
            and info["width"] > 0 and info["height"] > 0)


def rle_run_lengths(counts: Any) -> Optional[List[int]]:
    """The run lengths of an RLE ``counts`` (a list of ints, or pycocotools' compressed string), None if malformed.
    The string format is pycocotools' ``rleFrString``: 5 bits per character (offset 48), bit 0x20 = more, bit
    0x10 of the last character = negative, and from the third run on a delta to the run two before."""
    if isinstance(counts, list):
        return counts if all(is_int(c) and c >= 0 for c in counts) else None
    if not isinstance(counts, str):
        return None
    runs: List[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the string ends inside a number
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def check_segmentation(seg: Any, height: int, width: int) -> Tuple[bool, Any]:
    """(well formed, cleaned segmentation). Polygons: lists of finite numbers (their geometry is judged later);
    RLE: ``size == [height, width]`` and run lengths summing to height * width. None/absent is well formed."""
    if seg is None:
        return True, None
    if isinstance(seg, list):
        if not all(isinstance(p, list) and all(is_number(v) for v in p) for p in seg):
            return False, None
        return True, seg
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
            return False, None
        if list(size) != [height, width]:
            return False, None
        runs = rle_run_lengths(seg.get("counts"))
        if runs is None or sum(runs) != height * width:
            return False, None
        return True, seg
    return False, None


def check_annotation(a: Any, images: Dict[int, dict]) -> Tuple[Optional[str], Optional[dict]]:
    """(reason it is malformed or None, the record with its fields checked). ``images``: image records by id."""
    if not isinstance(a, dict):
        return "anns_not_an_object", None
    if not is_int(a.get("image_id")) or a["image_id"] not in images:
        return "anns_bad_image_id", None
    if not is_int(a.get("category_id")):
        return "anns_bad_category_id", None
    bbox = a.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return "anns_bad_bbox", None
    if "area" in a and not is_number(a["area"]):
        return "anns_bad_area", None
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd", 0), float):
        return "anns_bad_iscrowd", None
    info = images[a["image_id"]]
    ok, seg = check_segmentation(a.get("segmentation"), info["height"], info["width"])
    if not ok:
        return "anns_bad_segmentation", None
    return None, dict(a, bbox=[float(v) for v in bbox], segmentation=seg, iscrowd=int(a.get("iscrowd", 0)))


def summary_lines(stats: Dict[str, int], examples: Dict[str, Any], ann_file: Path) -> List[str]:
    """One line per reason a record was left out, with a count and an example (for the log)."""
    return [f"{ann_file}: left out {stats[key]} record(s): {text} (first: {str(examples.get(key))[:100]})"
            for key, text in REASONS.items() if stats.get(key)]
