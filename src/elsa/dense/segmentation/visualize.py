"""Drawing a predicted class map over its image (``elsa seg predict``)."""
from __future__ import annotations

from typing import Optional, Sequence

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


def add_legend(overlay: np.ndarray, pred: np.ndarray, num_classes: int,
               names: Optional[Sequence[str]] = None, max_entries: int = 20) -> np.ndarray:
    """``overlay`` with a panel on its right listing the classes present in ``pred`` (largest first, at most
    ``max_entries``): a swatch of the overlay colour, the name (or number) and the share of pixels."""
    from PIL import Image, ImageDraw, ImageFont

    palette = palette_for(num_classes)
    classes, counts = np.unique(np.clip(pred, 0, num_classes - 1), return_counts=True)
    order = np.argsort(-counts)[:max_entries]
    font = ImageFont.load_default()
    row, pad, swatch = 14, 4, 10
    labels = [f"{names[int(classes[i])] if names else f'class {int(classes[i])}'}: "
              f"{100 * counts[i] / pred.size:.1f}%" for i in order]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(t, font=font)) for t in labels)
    h, w = overlay.shape[:2]
    panel_w = pad * 3 + swatch + text_w
    height = max(h, pad * 2 + row * len(labels))
    canvas = Image.new("RGB", (w + panel_w, height), (255, 255, 255))
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (i, text) in enumerate(zip(order, labels)):
        y = pad + k * row
        colour = tuple(int(c) for c in palette[int(classes[i])])
        draw.rectangle([w + pad, y + 1, w + pad + swatch, y + 1 + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((w + 2 * pad + swatch, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
