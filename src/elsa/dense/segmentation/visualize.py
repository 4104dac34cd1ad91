"""Drawing a predicted class map over its image (``elsa seg predict``)."""
from __future__ import annotations

import numpy as np

from .ade20k_meta import palette_for


def render_overlay(rgb: np.ndarray, pred: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """The class map coloured with the ADE20K palette and blended over the image: (H, W, 3) uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    palette = np.asarray(palette_for(num_classes), dtype=np.float32)
    colour = palette[np.clip(pred, 0, num_classes - 1)]
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
