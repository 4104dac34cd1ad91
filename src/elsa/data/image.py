"""Decoding images to 8-bit RGB, the one way every task and tool reads an image file."""
from __future__ import annotations

import numpy as np
from PIL import Image

# 16- and 32-bit integer grey images: Pillow's convert("RGB") clips their values at 255, so a 16-bit PNG came out
# all white. Their pixels are 16-bit samples (PNG, TIFF), scaled here to 8 bits.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit grey is scaled by 255/65535 (not clipped); float grey ('F') is taken as 0..255."""
    if img.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def open_rgb(path) -> Image.Image:
    """Read ``path`` and decode it now (a truncated file fails here, not later in a transform)."""
    with Image.open(path) as img:
        return to_rgb(img)
