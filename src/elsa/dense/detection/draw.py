"""Drawing detections over an image (``elsa det predict``): one colour per class, labels kept inside the picture."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from torch import Tensor

# 20 well-separated colours (matplotlib's tab20 order, dark then light), cycled for more classes
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]


def class_colour(label: int) -> tuple:
    """The colour of class ``label`` (1..K)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, texts: Sequence[str],
                    masks: Optional[Tensor] = None) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (3, H, W) uint8 with ``masks`` (N, H, W) bool blended and ``boxes`` (N, 4)
    xyxy outlined in their class colour, each with its text on a filled tag placed inside the picture (above the
    box when there is room, else inside it; shifted left at the right edge). The drawing keeps the image's size,
    so it lines up pixel for pixel with the input."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import draw_segmentation_masks

    colours: List[tuple] = [class_colour(int(l)) for l in labels]
    canvas = image
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colours)
    pil = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    width, height = pil.size
    for box, colour, text in zip(boxes.tolist(), colours, texts):
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        tx = min(max(0.0, x0), max(0.0, width - tw))            # inside the right edge
        ty = y0 - th if y0 - th >= 0 else min(max(0.0, y0), max(0.0, height - th))  # above the box, else inside
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        text_colour = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((tx + 2 - l, ty + 2 - t), text, fill=text_colour, font=font)
    return np.asarray(pil)
