"""The evaluation loop behind ``elsa validate``: top-1/top-5 accuracy and cross-entropy of a classifier."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .common import Autocast, PathLike, ToolError

_logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracies in percent, mean cross-entropy over all images, and the wall time of the loop."""
    top1: float
    top5: float
    loss: float
    num_images: int
    time_s: float
    topk: int = 5  # the "top-5" is top-min(5, num_classes)

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.time_s if self.time_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return dict(asdict(self), images_per_s=self.images_per_s)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: Union[str, torch.device] = "cpu",
    amp: bool = False,
    wrap: Optional[Callable[[Iterable], Iterable]] = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` (batches of (images (B, 3, H, W), labels (B,))) and score it.

    ``wrap`` decorates the batch iterator (the CLI passes a tqdm bar; library code stays silent). Logits are
    scored in float32 so mixed precision changes only the forward pass."""
    device = torch.device(device)
    model.eval()
    autocast = Autocast(amp, device)
    # Sums stay on the device (no host sync per batch); labels are range-checked on the host (loader output).
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    num_classes = topk = None
    start = time.perf_counter()
    for images, labels in (wrap(loader) if wrap is not None else loader):
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, -1)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        if num_classes is None:
            num_classes = logits.shape[-1]
            topk = min(5, num_classes)
        if low < 0 or high >= num_classes:
            raise ToolError(f"the data has label {high if high >= num_classes else low} but the model has "
                            f"{num_classes} classes (check --num-classes and that DATA's class folders match the "
                            f"checkpoint's classes)")
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        hit = logits.topk(topk, dim=1).indices == labels[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
        count += labels.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if count == 0:
        raise ToolError("the data set is empty: nothing to evaluate")
    return EvalResult(top1=100.0 * int(correct1) / count, top5=100.0 * int(correct5) / count,
                      loss=float(loss_sum) / count, num_images=count, time_s=elapsed, topk=topk or 5)


def resolve_split(data: PathLike, split: Optional[str] = None) -> Path:
    """The image folder to score: DATA/SPLIT when ``split`` is given, else DATA/val when it exists, else DATA."""
    root = Path(data)
    if not root.is_dir():
        raise ToolError(f"DATA: {str(root)!r} is not a directory (expected an ImageFolder root, one folder per "
                        f"class, or a root holding a 'val' folder; or the word 'digits')")
    if split is not None:
        path = root / split
        if not path.is_dir():
            raise ToolError(f"--split: {str(path)!r} is not a directory")
        return path
    return root / "val" if (root / "val").is_dir() else root


def image_folder_dataset(root: PathLike, transform: Callable) -> Dataset:
    """timm's ImageDataset over ``root`` (class folders sorted by name -> label index, as ImageNet's synsets)."""
    from timm.data import ImageDataset

    try:
        dataset = ImageDataset(str(root), transform=transform)
    except Exception as err:  # timm raises RuntimeError/AssertionError for empty or odd folders
        raise ToolError(f"DATA: cannot read {str(root)!r} as an image folder: {err}") from err
    if len(dataset) == 0:
        raise ToolError(f"DATA: {str(root)!r} holds no images")
    return dataset


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: Union[str, torch.device]) -> DataLoader:
    """A deterministic (unshuffled) loader; pinned memory only when feeding a GPU."""
    if batch_size < 1:
        raise ToolError(f"-b/--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ToolError(f"-j/--workers must be >= 0, got {workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", drop_last=False)


__all__ = ["EvalResult", "evaluate", "image_folder_dataset", "make_loader", "resolve_split"]
