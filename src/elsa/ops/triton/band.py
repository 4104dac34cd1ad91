"""Launchers for the tensor-core (row-band) kernels of ``kernels_tc.py``; ``op.py`` dispatches here.

They apply at stride 1, without the multiplicative ghost, for float16/bfloat16 and at least 16 channels (the
smallest tensor-core operand) per head; everything else runs the CUDA-core kernels of ``kernels.py``. float32 stays on
the CUDA-core kernels on purpose: ``tl.dot`` would use TF32 (10-bit mantissa) and miss the float32 tolerance.

Backward: ``elsa_band_bwd_attn_kernel`` gives the attention (logit) and additive-ghost gradients and the
log-sum-exp, then the forward kernel run ``TRANSPOSED`` gives the v gradient.

Head-aware like the op: v, grad (B, G*C, H, W) and the logits (B, G*K*K, H, W) are read through their strides,
the ghost is (G, C, K, K) or (B, G, C, K, K), and the launchers write into the caller's (channels-last) outputs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .._custom_op import channels_last_empty
from . import kernels_tc
from .layout import ghost_grad, ghost_grad_rows, ghost_strides

INTERPRET = isinstance(kernels_tc.elsa_band_kernel, InterpretedFunction)

# (BLOCK_C, TILE_H, TILE_W, warps, pipeline stages): the cheapest spill-free tiles in benchmarks/kernel_sass.py at
# the ELSA-Swin stages, in both layouts. 32 x 8 tiles with 8 warps win every kernel at stages 1 and 2 (the
# ghost's Toeplitz band, built per channel block and neighbour row, is shared by 32 pixel rows, and the
# ghost-gradient product contracts over 32 of them); at 14 x 14 (stage 3) 16-row tiles pad less. 8 x 8 tiles
# (56 = 7 x 8: no padded pixels) for the v gradient of contiguous maps; 64 and 16 channel blocks for other head
# widths. TILE_H >= 16 in the backward (it is the contraction of the ghost-gradient product). The interpreter
# runs the first one, a tile size a GPU really uses; the tests run every one (fixed_tile).
BAND_TILES = [(32, 16, 16, 8, 2), (32, 32, 8, 8, 1), (32, 16, 8, 4, 1), (32, 8, 8, 2, 1), (32, 16, 8, 4, 2),
              (32, 16, 16, 8, 1), (64, 16, 16, 8, 2), (16, 16, 16, 4, 2)]
BAND_BWD_TILES = [(32, 16, 16, 8, 3), (32, 32, 8, 8, 2), (32, 16, 16, 8, 4), (32, 16, 16, 8, 2), (32, 16, 8, 4, 2),
                  (64, 16, 16, 8, 2)]
MIN_CHANNELS = 16


def applies(v: Tensor, ghost_mul: Optional[Tensor], stride: int, num_heads: int = 1) -> bool:
    """Whether the tensor-core kernels cover this call (v: (B, G*C, H, W) with G = num_heads)."""
    return (stride == 1 and ghost_mul is None and v.dtype in (torch.float16, torch.bfloat16)
            and v.shape[1] // num_heads >= MIN_CHANNELS)


def span(tile_w: int, kernel_size: int, dilation: int, vec: int) -> int:
    """Width of the source window of a row of TILE_W pixels: a power of two (a tl.dot dimension). The window
    starts K//2 * dilation rounded up to ``vec`` columns left of the tile (kernels_tc._pad)."""
    half = (kernel_size // 2) * dilation
    return triton.next_power_of_2(tile_w + half + (half + vec - 1) // vec * vec)


def slots(kernel_size: int) -> int:
    """Logit slots per neighbour row: a power of two with at least one spare (zero) slot for the band's
    empty entries to gather from (kernels_tc._band_index)."""
    return triton.next_power_of_2(kernel_size + 1)


def window_vector(args: dict) -> int:
    """vector_width, narrowed until aligning the window to it does not widen SPAN (8-wide tiles: 4)."""
    vec = vector_width(args)
    tile_w, k, dil = args["TILE_W"], args["K"], args["DIL"]
    while vec > 1 and span(tile_w, k, dil, vec) > span(tile_w, k, dil, 1):
        vec //= 2
    return vec


def _as_src(args: dict, name: str) -> dict:
    """The arguments with tensor ``name``'s pointer and strides under the names vector_width reads."""
    return dict(args, src_ptr=args[f"{name}_ptr"], **{f"ss_{d}": args[f"s{name}_{d}"] for d in "bchw"})


def vector_width(args: dict) -> int:
    """The widest vector of 16-bit columns (8, 4, 2, or 1 for none) the source's rows are made of: W, its strides
    and its address multiples of it, unit column stride (kernels_tc._window_columns). A channels-last source
    (column stride G*C) has none: its loads are vectors along the channels instead."""
    for vec in (8, 4, 2):
        if (args["W"] % vec == 0 and args["ss_w"] == 1 and args["ss_h"] % vec == 0 and args["ss_c"] % vec == 0
                and args["ss_b"] % vec == 0 and args["src_ptr"].data_ptr() % (2 * vec) == 0):
            return vec
    return 1


def _configs(tiles):
    tiles = tiles[:1] if INTERPRET else tiles
    return [triton.Config({"BLOCK_C": c, "TILE_H": h, "TILE_W": w}, num_warps=nw, num_stages=ns)
            for c, h, w, nw, ns in tiles]


def _prune(configs, named_args, **kwargs):
    """Drop channel blocks wider than the channels need (keeping the narrowest)."""
    narrowest = min(cfg.kwargs["BLOCK_C"] for cfg in configs)
    widest = max(triton.next_power_of_2(named_args["C"]), narrowest)
    return [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= widest]


_SPAN = {"SPAN": lambda args: span(args["TILE_W"], args["K"], args["DIL"], args["VEC"])}
_KEY = ["C", "H", "W", "K", "DIL", "SOFTMAX"]
_KP = {"KP": lambda args: slots(args["K"])}
# The channel and column strides are in the keys: channels-last maps (the layer's) and contiguous ones vectorise
# along different axes, and their best tiles differ.
_band = triton.autotune(configs=_configs(BAND_TILES), key=_KEY + ["TRANSPOSED", "HAS_ADD", "ss_c", "ss_w"],
                        prune_configs_by={"early_config_prune": _prune})(
    triton.heuristics(dict(VEC=window_vector, **_SPAN, **_KP, EVEN_C=lambda args: args["C"] % args["BLOCK_C"] == 0))(
        kernels_tc.elsa_band_kernel))
_band_bwd_attn = triton.autotune(configs=_configs(BAND_BWD_TILES),
                                 key=_KEY + ["NEED_ATTN", "NEED_ADD", "WRITE_LSE", "sv_c", "sv_w"],
                                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["gd_ptr"])(
    triton.heuristics(dict(VEC=lambda args: window_vector(_as_src(args, "v")),
                           G_VEC=lambda args: vector_width(_as_src(args, "g")),
                           **_SPAN, **_KP, ALL_C=lambda args: args["C"] <= args["BLOCK_C"]))(
        kernels_tc.elsa_band_bwd_attn_kernel))


_fixed_tile: Optional[tuple[int, int, int, int, int]] = None


@contextlib.contextmanager
def fixed_tile(tile: tuple[int, int, int, int, int]):
    """Launch the tensor-core kernels whose candidate list holds this (BLOCK_C, TILE_H, TILE_W, warps, stages)
    with it instead of the autotuner's choice (the others autotune as usual): the tests check each tile a GPU
    may pick, not only the one that wins there."""
    global _fixed_tile
    previous, _fixed_tile = _fixed_tile, tile
    try:
        yield
    finally:
        _fixed_tile = previous


def _launch(kernel, tiles, grid, *args, **kwargs) -> None:
    if _fixed_tile not in tiles:
        kernel[grid](*args, **kwargs)
    else:
        c, h, w, warps, stages = _fixed_tile
        kernel.fn[grid](*args, **kwargs, BLOCK_C=c, TILE_H=h, TILE_W=w, num_warps=warps, num_stages=stages)


def _grid(n: int, c: int, h: int, w: int, per_channel_block: bool):
    def grid(meta):
        blocks = triton.cdiv(c, meta["BLOCK_C"]) if per_channel_block else 1
        return (n * blocks * triton.cdiv(h, meta["TILE_H"]) * triton.cdiv(w, meta["TILE_W"]),)
    return grid


def band_aggregate(src: Tensor, attn: Tensor, ghost_add: Optional[Tensor], lse: Optional[Tensor], out: Tensor,
                   kernel_size: int, dilation: int, softmax: bool, transposed: bool, num_heads: int) -> Tensor:
    """Forward (src = v) or v-gradient (src = grad, ``transposed``; with ``softmax`` needs ``lse``) into ``out``
    (B, G*C, H, W), any strides."""
    b, gc, h, w = src.shape
    c = gc // num_heads
    _launch(
        _band, BAND_TILES, _grid(b * num_heads, c, h, w, True),
        src, attn, ghost_add if ghost_add is not None else src, lse if lse is not None else out, out,
        c, h, w, num_heads, *src.stride(), *attn.stride(), *ghost_strides(ghost_add, num_heads), *out.stride(),
        K=kernel_size, DIL=dilation, HAS_ADD=ghost_add is not None, SOFTMAX=softmax, TRANSPOSED=transposed,
        UPCAST_DOT=INTERPRET,
    )
    return out


def backward(grad: Tensor, v: Tensor, attn: Tensor, ghost_add: Optional[Tensor], kernel_size: int, dilation: int,
             softmax: bool, need_v: bool, need_attn: bool, need_add: bool, num_heads: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad v, grad attn or logits, grad ghost_add), v and the attention's channels-last; an empty tensor for
    one not asked for."""
    b, gc, h, w = v.shape
    c, kk, n = gc // num_heads, kernel_size * kernel_size, b * num_heads
    need_add = need_add and ghost_add is not None
    empty = lambda: v.new_empty(0)  # noqa: E731
    ga = channels_last_empty(attn, b, num_heads * kk, h, w) if need_attn else None
    # With the softmax, dp = sum_c g * v_k stays float32 until the softmax backward has used it; laid out as ga.
    dp = channels_last_empty(attn, b, num_heads * kk, h, w, torch.float32) if need_attn and softmax else None
    rows, gd_stride = ghost_grad_rows((ghost_add,), b, num_heads, c, kk)
    gd = torch.zeros((rows, num_heads, c, kk), device=v.device, dtype=torch.float32) if need_add else None
    lse = torch.empty((n, h, w), device=v.device, dtype=torch.float32) if softmax and need_v else None
    dummy = torch.empty(1, device=v.device, dtype=torch.float32)
    if need_attn or need_add or lse is not None:
        _launch(
            _band_bwd_attn, BAND_BWD_TILES, _grid(n, c, h, w, False),
            grad, v, attn, ga if ga is not None else dummy, dp if dp is not None else dummy,
            gd if gd is not None else dummy,
            lse if lse is not None else dummy,
            c, h, w, num_heads, *grad.stride(), *v.stride(), *attn.stride(),
            *(ga.stride() if ga is not None else (0, 0, 0, 0)), gd_stride,
            K=kernel_size, DIL=dilation, SOFTMAX=softmax, WRITE_LSE=lse is not None,
            NEED_ATTN=need_attn, NEED_ADD=need_add, UPCAST_DOT=INTERPRET,
        )
    gv = empty()
    if need_v:
        gv = band_aggregate(grad, attn, ghost_add, lse, channels_last_empty(v, b, gc, h, w), kernel_size, dilation,
                            softmax, True, num_heads)
    ga = ga if ga is not None else empty()
    return gv, ga, ghost_grad(gd, ghost_add, v)
