"""What an ELSA block attends to (``elsa visualize``).

For chosen pixels of one ELSA block this shows each head's K x K Hadamard attention (the softmax of the
attention logits at that pixel), the head's ghost head (``m ** lam`` and/or ``d * gamma``, averaged over the
head's value channels; it is the same at every pixel) and the filter the head finally applies,
``mean_c(m_c * a + d_c)`` over the head's channels. The block input is captured with a forward pre-hook on the
block's ``attn`` module, whose input is ``norm1(x)`` as (B, H, W, C).
"""
from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..io import save_png
from ..layers import ELSA
from .common import PathLike, ToolError

_logger = logging.getLogger(__name__)


def elsa_blocks(model: nn.Module) -> list[str]:
    """Names of the modules whose ``attn`` is an ELSA layer (e.g. ``layers.0.blocks.0``), in model order."""
    return [name for name, m in model.named_modules() if isinstance(getattr(m, "attn", None), ELSA)]


@dataclass
class AttentionMaps:
    """Everything the figure shows. Pixels are (y, x) in the model input; ``map_pixels`` the same pixels on the
    attention map (the block's map divided by the ELSA stride). Tensors are float32 on the CPU.

    attention: (P, G, K, K) softmax; combined: (P, G, K, K) = mean over the head's channels of m * a + d;
    ghost_mul, ghost_add: (G, K, K) channel means of m ** lam and d * gamma, or None when the layer has none.
    """
    image: np.ndarray  # (H, W, 3) in [0, 1], the preprocessed input with the normalisation undone
    block: str
    pixels: list[tuple[int, int]]
    map_pixels: list[tuple[int, int]]
    map_size: tuple[int, int]
    cell: tuple[float, float]  # input pixels per cell of the block's input map (y, x)
    kernel_size: int
    dilation: int
    stride: int
    lam: float
    gamma: float
    attention: Tensor
    combined: Tensor
    ghost_mul: Optional[Tensor]
    ghost_add: Optional[Tensor]


def default_pixels(height: int, width: int) -> list[tuple[int, int]]:
    """Three pixels on the diagonal (a quarter, half, three quarters of the way), spread over the image."""
    return [(height * f // 4, width * f // 4) for f in (1, 2, 3)]


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    image: Tensor,
    block: Optional[str] = None,
    pixels: Optional[Sequence[tuple[int, int]]] = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> AttentionMaps:
    """Run ``model`` on ``image`` (3, H, W), normalised with ``mean``/``std``, and read out one ELSA block.

    ``block`` defaults to the first ELSA block; ``pixels`` ((y, x) in the input image) to ``default_pixels``."""
    if image.ndim != 3:
        raise ToolError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
    names = elsa_blocks(model)
    if not names:
        raise ToolError(f"{type(model).__name__} has no ELSA blocks to visualise")
    block = block or names[0]
    if block not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ToolError(f"--block: {block!r} is not an ELSA block of {type(model).__name__}; choose one of: {shown}")
    height, width = image.shape[-2:]
    pixels = list(pixels) if pixels else default_pixels(height, width)
    for y, x in pixels:
        if not (0 <= y < height and 0 <= x < width):
            raise ToolError(f"--pixels: ({y},{x}) is outside the {height}x{width} model input "
                            f"(expected 0 <= y < {height}, 0 <= x < {width})")
    attn: ELSA = model.get_submodule(block).attn
    captured = {}

    def hook(_module: nn.Module, args: tuple) -> None:
        captured["x"] = args[0].detach()

    handle = attn.register_forward_pre_hook(hook)
    was_training = model.training
    try:
        model.eval()
        model(image.unsqueeze(0).to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    x = captured["x"].float()  # (1, Hb, Wb, C)
    attn = attn.float() if next(attn.parameters()).dtype != torch.float32 else attn
    hb, wb = x.shape[1:3]
    logits = attn.attention_logits(x.permute(0, 3, 1, 2))  # (1, G*K*K, Ho, Wo)
    g, k = attn.num_heads, attn.kernel_size
    ho, wo = logits.shape[-2:]
    probs = logits.reshape(g, k * k, ho, wo).softmax(dim=1).reshape(g, k, k, ho, wo).cpu()
    cell = (height / hb, width / wb)
    map_pixels = [(min(int(y / cell[0]) // attn.stride, ho - 1), min(int(x / cell[1]) // attn.stride, wo - 1))
                  for y, x in pixels]
    attention = torch.stack([probs[..., i, j] for i, j in map_pixels])  # (P, G, K, K)
    mul, add = attn.ghosts()  # each (G, C//G, K, K) or None
    ghost_mul = mul.float().mean(dim=1).cpu() if mul is not None else None
    ghost_add = add.float().mean(dim=1).cpu() if add is not None else None
    combined = attention * (ghost_mul if ghost_mul is not None else 1.0)
    if ghost_add is not None:
        combined = combined + ghost_add
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    shown = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()
    return AttentionMaps(image=shown, block=block, pixels=[(int(y), int(x)) for y, x in pixels],
                         map_pixels=map_pixels, map_size=(ho, wo), cell=cell, kernel_size=k,
                         dilation=attn.dilation, stride=attn.stride, lam=attn.lam, gamma=attn.gamma,
                         attention=attention, combined=combined, ghost_mul=ghost_mul, ghost_add=ghost_add)


def _window(maps: AttentionMaps, i: int, j: int) -> tuple[float, float, float, float]:
    """(x0, y0, width, height) in input pixels of the K x K neighbourhood of attention-map cell (i, j)."""
    half = maps.kernel_size // 2 * maps.dilation
    cy, cx = maps.cell
    y0, x0 = (i * maps.stride - half) * cy, (j * maps.stride - half) * cx
    return x0 - 0.5, y0 - 0.5, (2 * half + 1) * cx, (2 * half + 1) * cy


# Pixels side by side in one band of the figure (more pixels wrap to further bands).
PIXELS_PER_BAND = 4


def plot_attention_maps(maps: AttentionMaps, out: PathLike, heads: Optional[Sequence[int]] = None,
                        dpi: int = 100) -> Path:
    """Write the figure as a PNG (atomically) and return its path.

    Layout: one row per head (``heads``, default all). The left column(s) hold the head's ghost head(s); then,
    for each pixel, the head's attention softmax(a) and its filter mean(m * a + d). The top row shows the input
    with every pixel numbered (above the ghost columns) and, above each pixel's pair of columns, the input with
    that pixel and its K x K window (in input pixels) drawn. Each panel has its own colour scale and colorbar.
    More than ``PIXELS_PER_BAND`` pixels wrap into further bands (a grid), and the title wraps to the width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    num_heads = maps.attention.shape[1]
    heads = list(range(num_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad or not heads:
        raise ToolError(f"--heads: {bad or heads} not valid for block {maps.block}, which has heads 0..{num_heads - 1}")
    k = maps.kernel_size
    ghosts = [(t, name) for t, name in ((maps.ghost_mul, f"ghost m^{maps.lam:g}"),
                                        (maps.ghost_add, f"ghost d*{maps.gamma:g}")) if t is not None]
    lead = max(1, len(ghosts))
    num_pixels = len(maps.pixels)
    # A grid, not one endless row: at most PIXELS_PER_BAND pixels side by side; more pixels start a new band
    # (a row of window views, then one row per head), so many pixels stay readable.
    per_band = min(num_pixels, PIXELS_PER_BAND)
    bands = -(-num_pixels // per_band)
    band_rows = 1 + len(heads)
    rows, cols = bands * band_rows, lead + 2 * per_band
    fig = plt.figure(figsize=(2.3 * cols, 2.1 * rows + 0.9))
    grid = fig.add_gridspec(rows, cols)
    colors = plt.cm.tab10.colors

    def cell(n: int) -> tuple:
        """(top row of pixel n's band, its first column)."""
        return (n // per_band) * band_rows, lead + 2 * (n % per_band)

    def show_image(ax, title: str) -> None:
        ax.imshow(maps.image)
        ax.set_xlim(-0.5, maps.image.shape[1] - 0.5)
        ax.set_ylim(maps.image.shape[0] - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    def show_kernel(ax, data: Tensor, title: str, signed: bool) -> None:
        arr = data.numpy()
        if signed:
            bound = float(np.abs(arr).max()) or 1.0
            im = ax.imshow(arr, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        else:
            im = ax.imshow(arr, cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.plot([k // 2], [k // 2], marker="+", color="black" if signed else "white", markersize=8, mew=1.5)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.ax.tick_params(labelsize=6)

    # Each band's top row: the whole input, then one view per pixel of the band with its window.
    for band in range(bands):
        ax = fig.add_subplot(grid[band * band_rows, :lead])
        show_image(ax, f"input {maps.image.shape[0]}x{maps.image.shape[1]} (model input)")
        for n, (y, x) in enumerate(maps.pixels):
            ax.plot([x], [y], marker="x", color=colors[n % 10], markersize=9, mew=2)
            ax.annotate(str(n + 1), (x, y), xytext=(4, 4), textcoords="offset points", color=colors[n % 10],
                        fontsize=10, fontweight="bold")
    for n, ((y, x), (i, j)) in enumerate(zip(maps.pixels, maps.map_pixels)):
        top, col = cell(n)
        ax = fig.add_subplot(grid[top, col:col + 2])
        show_image(ax, f"pixel {n + 1}: (y={y}, x={x}) -> map cell ({i},{j})\nbox: its {k}x{k} window")
        ax.plot([x], [y], marker="x", color=colors[n % 10], markersize=9, mew=2)
        x0, y0, w, h = _window(maps, i, j)
        ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor=colors[n % 10], linewidth=2))

    # One row per head in each band.
    for band in range(bands):
        for r, head in enumerate(heads, band * band_rows + 1):
            for c, (tensor, name) in enumerate(ghosts):
                show_kernel(fig.add_subplot(grid[r, c]), tensor[head], f"head {head}: {name}\n(channel mean)", True)
            if not ghosts:
                ax = fig.add_subplot(grid[r, 0])
                ax.axis("off")
                ax.text(0.5, 0.5, f"head {head}\n(no ghost head)", ha="center", va="center", transform=ax.transAxes)
    for n in range(num_pixels):
        top, col = cell(n)
        for r, head in enumerate(heads, top + 1):
            show_kernel(fig.add_subplot(grid[r, col]), maps.attention[n, head],
                        f"head {head}, pixel {n + 1}\nattention softmax(a)", False)
            show_kernel(fig.add_subplot(grid[r, col + 1]), maps.combined[n, head],
                        f"head {head}, pixel {n + 1}\nfilter mean(m*a + d)", True)
    note = "" if maps.ghost_mul is not None else ", lam = 0 (no m ghost: m = 1)"
    title = (f"ELSA block {maps.block}: {num_heads} heads, K={k}, dilation={maps.dilation}, attention map "
             f"{maps.map_size[0]}x{maps.map_size[1]}{note}; + marks the query pixel")
    width_in = fig.get_size_inches()[0]
    fig.suptitle("\n".join(textwrap.wrap(title, max(30, int(width_in * 10)))), fontsize=11)
    height_in = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height_in))  # room for the (possibly wrapped) title
    out = Path(out)
    save_png(fig, out, dpi=dpi)
    _logger.info("wrote %s", out)
    return out


__all__ = ["AttentionMaps", "attention_maps", "default_pixels", "elsa_blocks", "plot_attention_maps"]
