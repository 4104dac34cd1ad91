"""Custom ops around the compiled CPU kernel (``kernel.cpp``): ``elsa::cpp_aggregate`` and its backward.

The op is head-aware: ``v`` (B, G*C, H, W) and the attention (B, G*K*K, Ho, Wo) are read through their strides,
so a channels-last projection's output goes in without a copy; the ghosts are (G, C, K, K) for the whole batch
(their gradient is reduced over the batch here) or (B, G, C, K, K) per sample. Outputs are channels-last:
``out.permute(0, 2, 3, 1)`` is the contiguous (B, Ho, Wo, G*C) map the output projection reads.

Registered with ``torch.library.custom_op``, fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces it as one opaque call.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from .. import _custom_op
from . import build

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# Ghost-gradient partial sums are kept per (sample, block of this many output rows) and summed in a fixed
# order afterwards: deterministic whatever the thread count, and small (1/8 of a row-per-row buffer).
_ROWS_PER_BLOCK = 8


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last(t: Tensor, inner: int) -> Tensor:
    """``t`` (B, X, H, W) itself when its channel axis has stride 1 (or holds one element per group), else a
    channels-last copy."""
    return t if t.stride(1) == 1 or inner == 1 else t.contiguous(memory_format=torch.channels_last)


def _ghost_rows(ghost: Optional[Tensor], heads: int, kk: int) -> Optional[Tensor]:
    """(G, C, K, K) or (B, G, C, K, K) -> contiguous (Bg, G, K*K, C) in the accumulation dtype."""
    if ghost is None:
        return None
    c = ghost.shape[-3]
    rows = ghost.to(_accumulation_dtype(ghost.dtype)).reshape(-1, heads, c, kk)
    return rows.transpose(-1, -2).contiguous()


def _params(v: Tensor, attn: Tensor, ghost_mul, ghost_add, kernel_size: int, dilation: int, stride: int,
            heads: int, softmax: bool, need=(False, False, False, False)) -> ctypes.Array:
    b, gc, h, w = v.shape
    c, kk = gc // heads, kernel_size * kernel_size
    ho, wo = attn.shape[-2:]
    ghost = ghost_mul if ghost_mul is not None else ghost_add
    ghost_batch = int(ghost is not None and ghost.dim() == 5)
    values = [b, heads, c, h, w, ho, wo, kernel_size, dilation, stride,
              v.stride(0), c * v.stride(1), v.stride(2), v.stride(3),
              attn.stride(0), kk * attn.stride(1), attn.stride(2), attn.stride(3),
              ghost_batch, int(softmax), int(ghost_mul is not None), int(ghost_add is not None),
              *(int(x) for x in need), _ROWS_PER_BLOCK]
    return (ctypes.c_int64 * len(values))(*values)


_NOT_APPLICABLE = 3  # the kernel's answer when the fused backward (pass 3) does not cover a case


def _run(pass_: int, dtype: torch.dtype, params, tensors: list[Optional[Tensor]]) -> int:
    lib = build.load()
    if lib is None:
        raise RuntimeError(build.failure() or "the compiled CPU kernel is unavailable")
    ptrs = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
    status = lib.elsa_cpu_run(_DTYPES[dtype], pass_, params, ptrs, torch.get_num_threads())
    if status not in (0, _NOT_APPLICABLE):  # pragma: no cover - why_not() rejects other dtypes first
        raise RuntimeError(f"elsa CPU kernel: unsupported dtype {dtype}")
    return status


@torch.library.custom_op("elsa::cpp_aggregate", mutates_args=())
def cpp_aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
    num_heads: int,
    softmax: bool,
) -> Tensor:
    """v: (B, G*C, H, W), attn: (B, G*K*K, Ho, Wo) (logits when ``softmax``) -> channels-last (B, G*C, Ho, Wo)."""
    kk = kernel_size * kernel_size
    v = _channels_last(v, v.shape[1] // num_heads)
    attn = _channels_last(attn, kk)
    b, gc = v.shape[:2]
    ho, wo = attn.shape[-2:]
    out = _custom_op.channels_last_empty(v, b, gc, ho, wo)
    params = _params(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax)
    _run(0, v.dtype, params, [v, attn, _ghost_rows(ghost_mul, num_heads, kk),
                              _ghost_rows(ghost_add, num_heads, kk), out])
    return out


@cpp_aggregate.register_fake
def _(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax):
    return _custom_op.fake_heads_forward(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads)


@torch.library.custom_op("elsa::cpp_aggregate_backward", mutates_args=())
def cpp_aggregate_backward(
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
    """Gradients (v, attn, ghost_mul, ghost_add); an empty tensor stands for one not asked for. With ``softmax``
    the attention gradient is the logits' gradient."""
    kk = kernel_size * kernel_size
    v = _channels_last(v, v.shape[1] // num_heads)
    attn = _channels_last(attn, kk)
    grad = grad.permute(0, 2, 3, 1).contiguous()  # (B, Ho, Wo, G*C), a view when it is channels-last already
    b, gc, h, w = v.shape
    ho, wo = attn.shape[-2:]
    c, acc = gc // num_heads, _accumulation_dtype(v.dtype)
    need_mul = need_mul and ghost_mul is not None
    need_add = need_add and ghost_add is not None
    params = _params(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax,
                     (need_v, need_attn, need_mul, need_add))
    mul, add = _ghost_rows(ghost_mul, num_heads, kk), _ghost_rows(ghost_add, num_heads, kk)
    blocks = -(-ho // _ROWS_PER_BLOCK)
    gattn = _custom_op.channels_last_empty(v, b, num_heads * kk, ho, wo) if need_attn else v.new_empty(0)
    parts = [v.new_empty((b, blocks, num_heads, kk, c), dtype=acc) if need else None
             for need in (need_mul, need_add)]
    gv = v.new_empty(0)
    fused = False
    if v.dtype == torch.float32 and c == 32 and (need_attn or need_mul or need_add or need_v):
        # one walk: grad_v scattered next to the attention gradient, no stored probabilities (kernel's pass 3)
        gv = v.new_zeros((b, h, w, gc)).permute(0, 3, 1, 2) if need_v else None
        fused = _run(3, v.dtype, params, [grad, v, attn, mul, add, gattn, *parts, gv]) == 0
        gv = gv if need_v else v.new_empty(0)
    if not fused:
        probs = v.new_empty((b, ho, wo, num_heads, kk), dtype=acc) if need_v else None
        if need_attn or need_mul or need_add or need_v:
            _run(1, v.dtype, params, [grad, v, attn, mul, probs, gattn, *parts])
        if need_v:
            gv = _custom_op.channels_last_empty(v, b, gc, h, w)
            _run(2, v.dtype, params, [grad, mul, add, probs, gv])

    def ghost_grad(part: Optional[Tensor], ghost: Optional[Tensor]) -> Tensor:
        if part is None:
            return v.new_empty(0)
        total = part.sum(1)  # (B, G, KK, C)
        if ghost.dim() == 4:  # one ghost for the whole batch
            total = total.sum(0)
        return total.to(ghost.dtype).transpose(-1, -2).contiguous().reshape(ghost.shape)

    return gv, gattn, ghost_grad(parts[0], ghost_mul), ghost_grad(parts[1], ghost_add)


@cpp_aggregate_backward.register_fake
def _(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, softmax,
      need_v, need_attn, need_mul, need_add):
    return _custom_op.fake_heads_gradients(v, attn, ghost_mul, ghost_add, need_v, need_attn, need_mul, need_add)


cpp_aggregate.register_autograd(_custom_op.make_backward(cpp_aggregate_backward),
                                setup_context=_custom_op.setup_context)
