"""Image folders (ROOT/CLASS/*.jpeg) checked before training, and a wrapper that skips unreadable images.

Why: a long training run should fail in its first second on a wrong path, an empty class folder or a val set whose
classes differ from train's, and should never die on hour 30 because one JPEG is truncated. The wrapper replaces an
unreadable sample by the next readable one and reports how many it skipped, so the count can be shown per epoch.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import natural_key
from .image import open_rgb

_logger = logging.getLogger(__name__)

# Decoding and file errors that mean "this one sample is bad", as opposed to a bug in the pipeline.
SAMPLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """The data on disk does not have the expected layout."""


class TransformError(RuntimeError, ValueError):
    """The transform failed on a decoded sample: the options that built it are wrong (``--ratio 0 0``), not the
    file, so it is never skipped as an unreadable sample (a ValueError: the CLI reports it as a user error)."""


def apply_transform(transform: Callable, *inputs: Any) -> Any:
    """``transform(*inputs)``, with any exception turned into a ``TransformError`` (see there)."""
    try:
        return transform(*inputs)
    except Exception as err:  # noqa: BLE001 - timm/torchvision raise ValueError, ZeroDivisionError, math errors...
        raise TransformError(f"the data transform failed ({type(err).__name__}: {err}); check the augmentation "
                             f"options (--scale, --ratio, --aa, --*interpolation, --reprob/--remode, --img-size)") \
            from err


def find_classes(root: os.PathLike) -> List[str]:
    """Class folder names directly under ``root``, in timm's natural order (so label ids match timm's readers)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist (expected ROOT/CLASS/IMAGE files)")
    classes = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if not classes:
        raise DatasetError(f"data folder {str(root)!r} has no class sub-folders (expected ROOT/CLASS/IMAGE files)")
    return classes


def scan_image_folder(root: os.PathLike, classes: Optional[Sequence[str]] = None
                      ) -> Tuple[List[Tuple[str, int]], List[str]]:
    """All (image path, class index) under ``root``/CLASS (recursively), sorted; raises ``DatasetError`` for a
    missing folder, a class folder without images, or (when ``classes`` is given) class names that differ.
    With ``classes``, folder ``classes[i]`` gets label i (mapped by name, whatever order the folders sort in)."""
    root = Path(root)
    found = find_classes(root)
    if classes is not None and set(classes) != set(found):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DatasetError(
            f"class folders of {str(root)!r} differ from the training classes: missing {missing[:10]}, "
            f"unexpected {extra[:10]} (both splits must have the same class folders)")
    extensions = get_img_extensions(as_set=True)
    samples: List[Tuple[str, int]] = []
    empty = []
    index = {c: i for i, c in enumerate(classes if classes is not None else found)}
    for name in found:
        idx = index[name]
        files = []
        for dirpath, _, filenames in os.walk(root / name, followlinks=True):
            files.extend(os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1].lower() in extensions)
        if not files:
            empty.append(name)
        samples.extend((f, idx) for f in sorted(files, key=natural_key))
    if empty:
        raise DatasetError(f"class folder(s) {empty[:10]} under {str(root)!r} contain no images "
                           f"(extensions {sorted(extensions)})")
    return samples, list(classes) if classes is not None else found


class ImageFolderDataset(torch.utils.data.Dataset):
    """ROOT/CLASS/*.jpeg as (transformed RGB image, class index). Raises on an unreadable image: wrap it in
    ``SkipUnreadable`` to skip those instead."""

    def __init__(self, root: os.PathLike, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.root = str(root)
        self.samples, self.classes = scan_image_folder(root, classes)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def filename(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = open_rgb(path)  # decodes the pixels here, so a truncated file fails here
        if self.transform is not None:
            img = apply_transform(self.transform, img)
        return img, target


class SkipUnreadable(torch.utils.data.Dataset):
    """The one policy for unreadable samples (classification and segmentation): an unreadable sample is replaced
    by the next readable one, warned about once per file, and counted.

    Items: a tuple item comes back as (*item, skipped), a dict item as {**item, "skipped": skipped}, where
    ``skipped`` counts the unreadable samples met for this item (usually 0); the collate functions sum them per
    batch and the engine per epoch. After ``max_retries`` unreadable samples in a row it raises, since then the
    data, not one file, is broken.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, max_retries: int = 20) -> None:
        self.dataset = dataset
        self.max_retries = max_retries
        self.warned: set = set()  # per process (each DataLoader worker warns once per file it meets)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (e.g. during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        skipped = 0
        first_error, first_name = None, None
        for _ in range(self.max_retries):
            try:
                item = self.dataset[index]
            except TransformError:
                raise
            except SAMPLE_ERRORS as err:
                skipped += 1
                name = self.dataset.filename(index) if hasattr(self.dataset, "filename") else f"index {index}"
                first_error, first_name = (first_error, first_name) if first_error is not None else (err, name)
                if name not in self.warned:
                    self.warned.add(name)
                    _logger.warning("skipped unreadable sample %s: %s", name, err)
                index = (index + 1) % len(self.dataset)
                continue
            return dict(item, skipped=skipped) if isinstance(item, dict) else (*item, skipped)
        raise DatasetError(f"{self.max_retries} unreadable samples in a row (first error: {first_error}; in "
                           f"{first_name}); the data set looks broken")


def collate_skipped(batch: Sequence[tuple]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Collate (image, target, skipped) samples into (images (B,C,H,W), targets (B,), skipped count)."""
    images = torch.stack([b[0] for b in batch])
    targets = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, targets, int(sum(b[2] for b in batch))
