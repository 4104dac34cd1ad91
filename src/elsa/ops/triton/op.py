"""Launchers and custom-op registration for the Triton ELSA kernels (``kernels.py``).

The ops are head-aware, as ``elsa::cpp_aggregate``: v (B, G*C, H, W) and the attention (B, G*K*K, Ho, Wo) are
read through their strides as a channels-last projection writes them; the ghosts are (G, C, K, K), one for the
whole batch (their gradient is reduced over the batch inside the kernels), or (B, G, C, K, K) per sample (the
dispatcher's flat form: G = 1); outputs are channels-last, so ``out.permute(0, 2, 3, 1)`` is the contiguous
map the next projection reads. A program works on one sample n = b * G + g: nothing is copied or expanded.

float16/bfloat16 calls at stride 1 with 16 or more channels per head and no multiplicative ghost (ELSA-Swin's)
go to the tensor-core kernels instead (``band.py``, ``kernels_tc.py``): ``_forward`` and ``_backward`` hand
them over first thing. Everything else runs the three CUDA-core kernels that make the operator (spec
section 1):

- ``elsa_fwd_kernel``: one program per (tile of output pixels, n, block of channels); the K*K loop runs
  inside the program, so the attention of the tile is read once per channel block (once in total when
  C <= BLOCK_C, the ELSA-Swin case: 32 channels per head), and v is gathered at shifted positions
  through L1/L2.
- ``elsa_bwd_attn_kernel``: one program per (tile of output pixels, n), looping over k and channel blocks;
  writes the attention gradient, and reduces the ghost gradients over its pixels before one float32
  ``atomic_add`` per (channel, k) (the only atomics; grad_v is gathered instead).
- ``elsa_bwd_v_kernel``: one program per (tile of input pixels, n, block of channels), gathering from
  the output positions whose neighbour k is the pixel (no atomics, deterministic).

With the fused softmax (``triton_softmax_aggregate``) the attention argument holds logits; the forward and
both backward kernels recompute the softmax in registers. The attention-gradient kernel also writes the
per-pixel log-sum-exp (N, Ho, Wo) float32 (1/K^2 of the logits' size) that the v-gradient kernel reuses, so
the softmaxed map is never stored.

The ops are registered with ``torch.library.custom_op`` (``elsa::triton_aggregate``,
``elsa::triton_softmax_aggregate``, ``elsa::triton_aggregate_backward``) with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces them as opaque calls.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .._custom_op import (channels_last_empty, fake_heads_forward, fake_heads_gradients, make_backward,
                          setup_context)
from . import band, kernels
from .layout import ghost_grad, ghost_grad_rows, ghost_strides

__all__ = ["heads_aggregate", "triton_aggregate", "triton_softmax_aggregate", "triton_aggregate_backward"]

# Triton decides between compiled and interpreted (TRITON_INTERPRET=1, CPU tensors) kernels when they are
# defined, i.e. when ``kernels`` was imported; ``why_not`` reads this flag rather than the environment.
INTERPRET = isinstance(kernels.elsa_fwd_kernel, InterpretedFunction)

# Tile shapes (BLOCK_C channels x BLOCK_P pixels, warps) the autotuner chooses from on a GPU. A thread holds
# BLOCK_C * BLOCK_P / (32 * warps) elements. The op is bound by instruction issue, not DRAM: the candidates
# are the cheapest in SASS instructions per element and neighbour for sm_90, with few or no register spills
# (benchmarks/kernel_sass.py; results/kernel_sass_sm90.json), plus a low-register one for occupancy.
# A one-warp tile of 32 channels broadcasts each ghost value through shared memory once for the warp; narrow
# channel blocks give each thread several pixels, which share the ghost loads the same way.
GATHER_TILES = [(32, 32, 1), (64, 32, 2), (32, 64, 4), (8, 128, 1), (8, 256, 2)]
# The attention-gradient kernel reduces over channels (dp) and over pixels (ghost gradients) at every
# neighbour; one-warp tiles keep both reductions inside a warp (no barrier).
REDUCE_TILES = [(32, 32, 1), (32, 64, 1), (16, 128, 1), (8, 128, 1), (8, 256, 1), (4, 256, 1)]
# The interpreter runs one tile (its cost grows with every config benchmarked), narrow enough that the tests'
# small channel counts cover one block, a partial block and several blocks.
INTERPRET_TILE = (4, 64, 1)


def tile_configs(tiles: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_C": c, "BLOCK_P": p}, num_warps=w) for c, p, w in tiles]


def _configs(tiles: list[tuple[int, int, int]]) -> list[triton.Config]:
    return tile_configs([INTERPRET_TILE] if INTERPRET else tiles)


def _prune_channel_blocks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop channel blocks wider than needed (C = 3 gains nothing from 32 lanes of channels)."""
    narrowest = min(cfg.kwargs["BLOCK_C"] for cfg in configs)
    widest = max(triton.next_power_of_2(named_args["C"]), narrowest)
    return [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= widest]


# Set from the chosen tile: EVEN_C drops the channel masks, ALL_C keeps the whole grad tile in registers.
_channel_heuristics = {
    "EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0,
}
_KEY = ["C", "H", "W", "Ho", "Wo", "K", "DIL", "STRIDE", "SOFTMAX"]
_PRUNE = {"early_config_prune": _prune_channel_blocks}
# The channel stride is in the keys: channels-last maps (the layer's) and contiguous ones favour different tiles.
_fwd = triton.autotune(configs=_configs(GATHER_TILES), key=_KEY + ["sv_c"], prune_configs_by=_PRUNE)(
    triton.heuristics(_channel_heuristics)(kernels.elsa_fwd_kernel))
# reset_to_zero: the ghost gradients are accumulated atomically, so every benchmarked run starts from zero.
_bwd_attn = triton.autotune(configs=_configs(REDUCE_TILES),
                            key=_KEY + ["WRITE_LSE", "NEED_ATTN", "NEED_MUL", "NEED_ADD", "sv_c"],
                            prune_configs_by=_PRUNE, reset_to_zero=["gm_ptr", "gd_ptr"])(
    triton.heuristics(dict(_channel_heuristics, ALL_C=lambda args: args["C"] <= args["BLOCK_C"]))(
        kernels.elsa_bwd_attn_kernel))
_bwd_v = triton.autotune(configs=_configs(GATHER_TILES), key=_KEY + ["sg_c"], prune_configs_by=_PRUNE)(
    triton.heuristics(_channel_heuristics)(kernels.elsa_bwd_v_kernel))


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
             kernel_size: int, dilation: int, stride: int, num_heads: int, softmax: bool) -> Tensor:
    b, gc, h, w = v.shape
    c, ho, wo = gc // num_heads, *attn.shape[-2:]
    out = channels_last_empty(v, b, gc, ho, wo)
    if band.applies(v, ghost_mul, stride, num_heads):  # tensor-core kernels (kernels_tc.py)
        with _on_device(v):
            return band.band_aggregate(v, attn, ghost_add, None, out, kernel_size, dilation, softmax,
                                       transposed=False, num_heads=num_heads)
    n = b * num_heads
    grid = lambda meta: (triton.cdiv(ho * wo, meta["BLOCK_P"]) * n * triton.cdiv(c, meta["BLOCK_C"]),)  # noqa: E731
    with _on_device(v):
        _fwd[grid](
            v, attn, ghost_mul if ghost_mul is not None else v, ghost_add if ghost_add is not None else v, out,
            c, h, w, ho, wo, num_heads,
            *v.stride(), *attn.stride(), *ghost_strides(ghost_mul, num_heads), *ghost_strides(ghost_add, num_heads),
            *out.stride(),
            K=kernel_size, DIL=dilation, STRIDE=stride,
            HAS_MUL=ghost_mul is not None, HAS_ADD=ghost_add is not None, SOFTMAX=softmax,
        )
    return out


def _backward(grad: Tensor, v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
              kernel_size: int, dilation: int, stride: int, num_heads: int, softmax: bool,
              need_v: bool, need_attn: bool, need_mul: bool, need_add: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if band.applies(v, ghost_mul, stride, num_heads):  # tensor-core kernels (kernels_tc.py)
        with _on_device(v):
            gv, ga, gd = band.backward(grad, v, attn, ghost_add, kernel_size, dilation, softmax,
                                       need_v, need_attn, need_add, num_heads)
        return gv, ga, v.new_empty(0), gd
    b, gc, h, w = v.shape
    ho, wo = attn.shape[-2:]
    kk = kernel_size * kernel_size
    c, n = gc // num_heads, b * num_heads
    need_mul = need_mul and ghost_mul is not None
    need_add = need_add and ghost_add is not None
    # Custom-op outputs may not alias each other: a fresh empty tensor for each gradient not asked for.
    empty = lambda: v.new_empty(0)  # noqa: E731
    geometry = dict(K=kernel_size, DIL=dilation, STRIDE=stride, SOFTMAX=softmax)
    m = ghost_mul if ghost_mul is not None else v
    d = ghost_add if ghost_add is not None else v
    m_strides, d_strides = ghost_strides(ghost_mul, num_heads), ghost_strides(ghost_add, num_heads)

    # With the softmax, ga first holds dp = sum_c g * v_k: kept in float32 until the softmax backward has used
    # it (rounded to bfloat16 it costs more than the bfloat16 tolerance at logits of realistic spread).
    ga = channels_last_empty(attn, b, num_heads * kk, ho, wo, torch.float32 if softmax else attn.dtype) \
        if need_attn else empty()
    # Ghost gradients are sums over every pixel (and, for a ghost shared by the batch, every sample), in float32.
    rows, gmd_stride = ghost_grad_rows((ghost_mul, ghost_add), b, num_heads, c, kk)
    gm = torch.zeros((rows, num_heads, c, kk), device=v.device, dtype=torch.float32) if need_mul else None
    gd = torch.zeros((rows, num_heads, c, kk), device=v.device, dtype=torch.float32) if need_add else None
    lse = torch.empty((n, ho, wo), device=v.device, dtype=torch.float32) if softmax and need_v else None

    # Pointer arguments a kernel does not touch. Never an input: the autotuner zeroes gm_ptr and gd_ptr.
    dummy = torch.empty(1, device=v.device, dtype=torch.float32)

    with _on_device(v):
        # Needed for attention/ghost gradients, and with the softmax also for the lse that grad_v uses.
        if need_attn or need_mul or need_add or lse is not None:
            grid = lambda meta: (triton.cdiv(ho * wo, meta["BLOCK_P"]) * n,)  # noqa: E731
            _bwd_attn[grid](
                grad, v, attn, m, ga if need_attn else dummy, gm if need_mul else dummy, gd if need_add else dummy,
                lse if lse is not None else dummy,
                c, h, w, ho, wo, num_heads,
                *grad.stride(), *v.stride(), *attn.stride(), *m_strides,
                *(ga.stride() if need_attn else (0, 0, 0, 0)), gmd_stride,
                HAS_MUL=ghost_mul is not None, WRITE_LSE=lse is not None,
                NEED_ATTN=need_attn, NEED_MUL=need_mul, NEED_ADD=need_add,
                **geometry,
            )
        gv = empty()
        if need_v:
            gv = channels_last_empty(v, b, gc, h, w)
            grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]) * n * triton.cdiv(c, meta["BLOCK_C"]),)  # noqa: E731
            _bwd_v[grid](
                grad, attn, m, d, lse if lse is not None else dummy, gv,
                c, h, w, ho, wo, num_heads,
                *grad.stride(), *attn.stride(), *m_strides, *d_strides, *gv.stride(),
                HAS_MUL=ghost_mul is not None, HAS_ADD=ghost_add is not None,
                **geometry,
            )
    ga = ga.to(attn.dtype)  # keeps the channels-last strides
    return gv, ga, ghost_grad(gm, ghost_mul, v), ghost_grad(gd, ghost_add, v)


# ---------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("elsa::triton_aggregate", mutates_args=())
def triton_aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
    num_heads: int = 1,
) -> Tensor:
    """v: (B, G*C, H, W), attn: (B, G*K*K, Ho, Wo), ghosts: (G, C, K, K), (B, G, C, K, K) or None
    -> channels-last (B, G*C, Ho, Wo). G = num_heads."""
    return _forward(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax=False)


@torch.library.custom_op("elsa::triton_softmax_aggregate", mutates_args=())
def triton_softmax_aggregate(
    v: Tensor,
    attn_logits: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
    num_heads: int = 1,
) -> Tensor:
    """``triton_aggregate`` with each head's softmax over its K*K logits done in registers."""
    return _forward(v, attn_logits, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax=True)


triton_aggregate.register_fake(fake_heads_forward)
triton_softmax_aggregate.register_fake(fake_heads_forward)


@torch.library.custom_op("elsa::triton_aggregate_backward", mutates_args=())
def triton_aggregate_backward(
    grad: Tensor,
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
    num_heads: int,
    softmax: bool,
    need_v: bool,
    need_attn: bool,
    need_mul: bool,
    need_add: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (v, attn, ghost_mul, ghost_add); an empty tensor stands for one not asked for. The first two
    are channels-last; a ghost's gradient has its shape (for (G, C, K, K), summed over the batch).

    With ``softmax`` ``attn`` holds the logits and the second gradient is the logits' gradient.
    """
    return _backward(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax,
                     need_v, need_attn, need_mul, need_add)


@triton_aggregate_backward.register_fake
def _(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax,
      need_v, need_attn, need_mul, need_add):
    return fake_heads_gradients(v, attn, ghost_mul, ghost_add, need_v, need_attn, need_mul, need_add)


triton_aggregate.register_autograd(make_backward(triton_aggregate_backward, False), setup_context=setup_context)
triton_softmax_aggregate.register_autograd(make_backward(triton_aggregate_backward, True), setup_context=setup_context)


# ---------------------------------------------------------------------------------------------------------
# backend entry point (called by elsa.ops after argument checks)


def heads_aggregate(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
                    kernel_size: int, dilation: int, stride: int, num_heads: int, softmax: bool) -> Tensor:
    """The head-aware entry, as ``elsa::cpp_aggregate``: v (B, G*C, H, W) and attn (B, G*K*K, H//s, W//s) read
    through their strides, ghosts (G, C, K, K) shared by the batch or (B, G, C, K, K) -> channels-last
    (B, G*C, H//s, W//s). With ``softmax`` attn holds logits."""
    op = triton_softmax_aggregate if softmax else triton_aggregate
    return op(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads)
