"""Token-labeling data: per-image label maps cropped and flipped together with the image.

Why: token labeling (Jiang et al., "All Tokens Matter", used by VOLO) supervises every output token with the
dense score map of a strong teacher. The map must follow the image's random-resized crop and flips, or the
tokens are supervised with the labels of other places; the remaining augmentations (RandAugment, colour,
normalisation, random erasing) change pixels only and apply to the image alone.

Label map files use the token-labeling project's format: one file per training image,
``<label_dir>/<image file stem>.pt`` (or ``.pth``), a tensor (2, K, S, S): ``[0]`` the top-K scores, ``[1]`` the
class indices (stored as float) on an S x S grid over the whole image. As in that project (and ReLabel), the K
scores are scattered into a dense (num_classes, S, S) map (other classes 0), the crop's region is taken with
``torchvision.ops.roi_align`` at the token grid size and a softmax over classes gives the token targets.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .folder import DatasetError, ImageFolderDataset, apply_transform
from .image import open_rgb

__all__ = ["LABEL_MAP_SUFFIXES", "TokenLabelDataset", "TokenLabelTransform", "collate_token_label",
           "crop_label_map", "load_label_map"]

LABEL_MAP_SUFFIXES = (".pt", ".pth")


def load_label_map(path: os.PathLike) -> torch.Tensor:
    """A (2, K, S, S) label map file; ``ValueError`` naming the file for any other shape."""
    from ..checkpoint import read_checkpoint

    value = read_checkpoint(path, "token label map")  # names the file and why it cannot be read
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[0] != 2 or \
            value.shape[2] != value.shape[3]:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"label map {str(path)!r} must be a tensor (2, K, S, S) of [scores, class indices], "
                         f"got {shape}")
    return value.float()


def crop_label_map(label_map: torch.Tensor, num_classes: int, box: Tuple[float, float, float, float],
                   out_size: int, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """Dense token targets (num_classes, out_size, out_size), softmax over classes, of one image crop.

    ``box`` = (top, left, height, width) as fractions of the image's height/width (the random-resized crop);
    the flips are applied after the crop, as they are to the image.
    """
    from torchvision.ops import roi_align

    scores, indices = label_map[0], label_map[1].long()
    if int(indices.max()) >= num_classes or int(indices.min()) < 0:
        raise ValueError(f"label map has class indices in [{int(indices.min())}, {int(indices.max())}], "
                         f"outside the model's {num_classes} classes")
    size = scores.shape[-1]
    dense = torch.zeros(num_classes, size, size).scatter_(0, indices, scores)
    top, left, height, width = box
    roi = torch.tensor([[0.0, left * size, top * size, (left + width) * size, (top + height) * size]])
    out = roi_align(dense[None], roi, output_size=out_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
    if hflip:
        out = out.flip(-1)
    if vflip:
        out = out.flip(-2)
    return out.softmax(dim=0)


class TokenLabelTransform:
    """timm's training transform split in two: the random-resized crop and flips (shared with the label map)
    and the pixel-only rest. Built from ``timm.data.create_transform(..., separate=True)``'s three parts.

    Called with (PIL image, label map) it returns (image tensor, dense target (num_classes, T, T)).
    """

    def __init__(self, parts: Sequence[Callable], num_classes: int, token_size: int) -> None:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms as T

        primary, self.secondary, self.final = parts
        steps = list(getattr(primary, "transforms", [primary]))
        crops = [t for t in steps if isinstance(t, RandomResizedCropAndInterpolation)]
        if len(crops) != 1:
            raise ValueError(f"token labeling needs timm's random-resized-crop training transform, got {primary}")
        self.crop = crops[0]
        self.hflip = sum(t.p for t in steps if isinstance(t, T.RandomHorizontalFlip))
        self.vflip = sum(t.p for t in steps if isinstance(t, T.RandomVerticalFlip))
        self.num_classes = num_classes
        self.token_size = token_size

    def __call__(self, img: Image.Image, label_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        import torchvision.transforms.functional as TF

        crop = self.crop
        img_w, img_h = img.size
        top, left, height, width = crop.get_params(img, crop.scale, crop.ratio)
        interp = crop.interpolation
        interp = random.choice(interp) if isinstance(interp, (tuple, list)) else interp
        img = TF.resized_crop(img, top, left, height, width, crop.size, interp)
        hflip = random.random() < self.hflip
        vflip = random.random() < self.vflip
        if hflip:
            img = TF.hflip(img)
        if vflip:
            img = TF.vflip(img)
        box = (top / img_h, left / img_w, height / img_h, width / img_w)
        target = crop_label_map(label_map, self.num_classes, box, self.token_size, hflip=hflip, vflip=vflip)
        img = self.final(self.secondary(img))
        return img, target


class TokenLabelDataset(torch.utils.data.Dataset):
    """An ``ImageFolderDataset`` whose samples are (image, (class index, dense target (num_classes, T, T))).

    Every image must have its label map; a missing one is a ``DatasetError`` at construction (naming the first
    missing files), not an error hours into training. A label map that cannot be read raises ``ValueError``
    or ``OSError`` naming the file, so ``SkipUnreadable`` skips and counts that sample like an unreadable image.
    """

    def __init__(self, base: ImageFolderDataset, label_dir: os.PathLike,
                 transform: Optional[TokenLabelTransform] = None) -> None:
        if not isinstance(base, ImageFolderDataset):
            raise DatasetError(f"token labeling needs an image folder data set (DATA/train/CLASS/*.jpeg, label maps "
                               f"named by image file), got {type(base).__name__}")
        label_dir = Path(label_dir)
        if not label_dir.is_dir():
            raise DatasetError(f"--token-label-dir {str(label_dir)!r} is not a folder")
        files: Dict[str, str] = {}
        for name in os.listdir(label_dir):
            stem, suffix = os.path.splitext(name)
            if suffix in LABEL_MAP_SUFFIXES:
                files.setdefault(stem, str(label_dir / name))
        self.label_files: List[str] = []
        missing = []
        for path, _ in base.samples:
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem in files:
                self.label_files.append(files[stem])
            else:
                missing.append(path)
        if missing:
            raise DatasetError(f"--token-label-dir {str(label_dir)!r} has no label map for {len(missing)} of "
                               f"{len(base.samples)} training images, e.g. {missing[:3]} (expected "
                               f"{str(label_dir)}/<image file stem>.pt or .pth, a (2, K, S, S) tensor)")
        self.base = base
        self.classes = base.classes
        self.targets = base.targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def filename(self, index: int) -> str:
        return self.base.filename(index)

    def __getitem__(self, index: int):
        path, target = self.base.samples[index]
        img = open_rgb(path)
        label_map = load_label_map(self.label_files[index])
        if self.transform is None:
            raise RuntimeError("TokenLabelDataset.transform is not set (a TokenLabelTransform)")
        img, dense = apply_transform(self.transform, img, label_map)
        return img, (target, dense)


def collate_token_label(batch: Sequence[tuple]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], int]:
    """Collate (image, (class index, dense target), skipped) into (images, (classes (B,), dense (B, C, T, T)),
    skipped count)."""
    images = torch.stack([b[0] for b in batch])
    classes = torch.as_tensor([int(b[1][0]) for b in batch], dtype=torch.long)
    dense = torch.stack([b[1][1] for b in batch])
    return images, (classes, dense), int(sum(b[2] for b in batch))
