"""Top-k classification of single images (``elsa predict``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .common import Autocast, PathLike, ToolError, load_image


@dataclass
class Prediction:
    """One image's top-k classes, most probable first: (class index, probability, name or None); or, for a file
    that could not be read, ``error`` and no classes."""
    image: str
    classes: list[tuple[int, float, Optional[str]]] = field(default_factory=list)
    error: Optional[str] = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image,
                "topk": [{"rank": r + 1, "index": i, "prob": p, "name": n} for r, (i, p, n) in enumerate(self.classes)]}


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[PathLike],
    transform: Callable,
    topk: int = 5,
    names: Optional[Sequence[str]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 32,
    amp: bool = False,
) -> list[Prediction]:
    """Softmax top-``topk`` of ``model`` for each image file (preprocessed by ``transform`` to (3, H, W)), in the
    order given. A file that cannot be read gets a Prediction with its ``error``; the others are still predicted."""
    if topk < 1:
        raise ToolError(f"--topk must be >= 1, got {topk}")
    if not images:
        raise ToolError("IMAGE: give at least one image file")
    device = torch.device(device)
    model.eval()
    autocast = Autocast(amp, device)
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        readable, tensors = [], []
        for path in images[start:start + batch_size]:
            try:
                tensors.append(transform(load_image(path)))
                readable.append(str(path))
            except ToolError as err:
                results.append(Prediction(str(path), error=str(err)))
        if not tensors:
            continue
        with autocast():
            logits = model(torch.stack(tensors).to(device))
        probs = logits.float().softmax(dim=-1)
        k = min(topk, probs.shape[-1])
        top = probs.topk(k, dim=-1)
        for path, p, i in zip(readable, top.values.tolist(), top.indices.tolist()):
            results.append(Prediction(path, [(c, prob, names[c] if names else None) for c, prob in zip(i, p)]))
    order = {str(p): n for n, p in enumerate(images)}
    return sorted(results, key=lambda r: order[r.image])


__all__ = ["Prediction", "predict"]
