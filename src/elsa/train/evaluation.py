"""The classification evaluation loop, one for ``elsa train`` (each epoch, over this rank's shard) and
``elsa validate`` (a checkpoint on a folder): cross-entropy, top-1 and top-k counts of a classifier."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Counts:
    """Sums over the batches seen: cross-entropy, images right at top-1 and at top-``topk``, images."""
    loss_sum: float = 0.0
    correct1: int = 0
    correctk: int = 0
    count: int = 0
    topk: int = 5  # min(5, number of classes)


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device,
          autocast: Callable[[], ContextManager]) -> Counts:
    """Run ``model`` (set to eval mode) over (images (B, 3, H, W), labels (B,)) batches under ``autocast``.

    Logits are scored in float32, so mixed precision changes only the forward pass; sums stay on the device (no
    host sync per batch). A label outside the model's classes raises a ValueError saying so."""
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correctk = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count, num_classes, topk = 0, None, 5
    for images, labels in batches:
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, -1)  # host-side check
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        if num_classes is None:
            num_classes = logits.shape[-1]
            topk = min(5, num_classes)
        if low < 0 or high >= num_classes:
            raise ValueError(f"the data has label {high if high >= num_classes else low} but the model has "
                             f"{num_classes} classes (check --num-classes and that DATA's class folders match the "
                             f"checkpoint's classes)")
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        hit = logits.topk(topk, dim=1).indices == labels[:, None]
        correct1 += hit[:, 0].sum()
        correctk += hit.any(dim=1).sum()
        count += labels.numel()
    return Counts(float(loss_sum), int(correct1), int(correctk), count, topk)
