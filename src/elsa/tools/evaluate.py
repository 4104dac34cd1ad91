"""The evaluation loop behind ``elsa validate``: top-1/top-5 accuracy and cross-entropy of a classifier."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
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
    skipped: int = 0  # unreadable images left out (not scored)

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.time_s if self.time_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return dict(asdict(self), images_per_s=self.images_per_s)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: Union[str, torch.device] = "cpu",
    amp: bool = False,
    wrap: Optional[Callable[[Iterable], Iterable]] = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` (batches of (images (B, 3, H, W), labels (B,))) and score it with the loop
    ``elsa train`` evaluates with (``elsa.train.evaluation.score``).

    ``wrap`` decorates the batch iterator (the CLI passes a tqdm bar; library code stays silent)."""
    from ..train.evaluation import score

    device = torch.device(device)
    start = time.perf_counter()
    skipped = 0

    def batches():  # loaders of make_loader give (images, labels, unreadable images left out of the batch)
        nonlocal skipped
        for batch in (wrap(loader) if wrap is not None else loader):
            if len(batch) == 3:
                skipped += int(batch[2])
                batch = batch[:2]
            if batch[1].numel():
                yield batch

    try:
        c = score(model, batches(), device, Autocast(amp, device))
    except ValueError as err:
        raise ToolError(str(err)) from err
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if c.count == 0:
        why = f"all {skipped} images are unreadable" if skipped else "the data set is empty"
        raise ToolError(f"nothing to evaluate: {why}")
    if skipped:
        _logger.warning("left out %d unreadable image(s); scored %d", skipped, c.count)
    return EvalResult(top1=100.0 * c.correct1 / c.count, top5=100.0 * c.correctk / c.count,
                      loss=c.loss_sum / c.count, num_images=c.count, time_s=elapsed, topk=c.topk, skipped=skipped)


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


def image_folder_dataset(root: PathLike, transform: Callable, classes: Optional[Sequence[str]] = None) -> Dataset:
    """The image folder at ``root`` read by the dataset class ``elsa train`` reads its folders with
    (``elsa.data.ImageFolderDataset``: class folders in timm's natural order -> label index, as ImageNet's synsets).

    ``classes``: the class names the checkpoint was trained with (label i = classes[i]); the class folders are
    mapped by name, and a folder whose class set differs is an error naming both (mapping by position would score
    against wrong labels)."""
    from ..data import DatasetError, ImageFolderDataset, find_classes

    try:
        if classes is not None:
            found = find_classes(root)
            if set(found) != set(classes):
                extra = [c for c in found if c not in set(classes)]
                missing = [c for c in classes if c not in set(found)]
                raise ToolError(f"DATA {str(root)!r}: its class folders {_some(found)} are not the classes the "
                                f"checkpoint was trained on {_some(list(classes))} (not in the checkpoint: "
                                f"{_some(extra)}; no folder: {_some(missing)}); labels would be wrong")
            _logger.info("class folders mapped to the checkpoint's %d class names", len(classes))
        return ImageFolderDataset(root, transform=transform, classes=list(classes) if classes is not None else None)
    except DatasetError as err:
        raise ToolError(f"DATA: {err}") from err


def _some(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


class LeaveOutUnreadable(Dataset):
    """Evaluation's policy for an unreadable image: left out (not replaced, so no image is scored twice), warned
    about once, and counted (``collate_left_out``). A transform error is the options' fault and still raises."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from ..data.folder import SAMPLE_ERRORS, TransformError

        try:
            return self.dataset[index]
        except TransformError:
            raise
        except SAMPLE_ERRORS as err:
            name = self.dataset.filename(index) if hasattr(self.dataset, "filename") else f"index {index}"
            _logger.warning("left out unreadable image %s: %s", name, err)
            return None


def collate_left_out(batch):
    """(images, labels, number of unreadable images left out) from items of ``LeaveOutUnreadable``."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), len(batch)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: Union[str, torch.device]) -> DataLoader:
    """A deterministic (unshuffled) loader; pinned memory only when feeding a GPU; unreadable images are left out
    and counted (``LeaveOutUnreadable``)."""
    if batch_size < 1:
        raise ToolError(f"-b/--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ToolError(f"-j/--workers must be >= 0, got {workers}")
    return DataLoader(LeaveOutUnreadable(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", drop_last=False, collate_fn=collate_left_out)


__all__ = ["EvalResult", "evaluate", "image_folder_dataset", "make_loader", "resolve_split"]
