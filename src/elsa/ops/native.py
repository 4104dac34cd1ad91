"""Memory-efficient PyTorch ELSA aggregation with a hand-written backward.

The unfold formulation materialises an (N, C, K*K, Ho, Wo) tensor. Here the sum over the K*K neighbours is
accumulated one shifted view of the zero-padded input at a time, so the largest temporary is one
(N, C, Ho, Wo) map. Because the operator is linear in each input, every gradient is a sum of the same
shifted products (spec section 1), which the backward accumulates in the same loop.

Registered as the custom ops ``elsa::native_aggregate`` / ``elsa::native_aggregate_backward`` with fake
implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _shifted(padded: Tensor, i: int, j: int, dilation: int, stride: int, ho: int, wo: int) -> Tensor:
    """View of ``padded`` (N, C, H+2p, W+2p) holding neighbour (i, j) of every output position."""
    y0, x0 = i * dilation, j * dilation
    return padded[:, :, y0:y0 + (ho - 1) * stride + 1:stride, x0:x0 + (wo - 1) * stride + 1:stride]


def _filter(attn: Tensor, m: Optional[Tensor], d: Optional[Tensor], k: int) -> Tensor:
    """Per-neighbour filter m_k * a_k + d_k, shape (N, 1 or C, Ho, Wo)."""
    f = attn[:, k:k + 1]
    if m is not None:
        f = f * m[:, :, k, None, None]
    if d is not None:
        f = f + d[:, :, k, None, None]
    return f


def _flat(g: Optional[Tensor], kk: int) -> Optional[Tensor]:
    return None if g is None else g.reshape(g.shape[0], g.shape[1], kk)


@torch.library.custom_op("elsa::native_aggregate", mutates_args=())
def native_aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    """v: (N, C, H, W), attn: (N, K*K, Ho, Wo), ghosts: (N, C, K, K) or None -> (N, C, Ho, Wo)."""
    n, c = v.shape[:2]
    ho, wo = attn.shape[-2:]
    kk = kernel_size * kernel_size
    pad = kernel_size // 2 * dilation
    vp = F.pad(v, (pad, pad, pad, pad))
    m, d = _flat(ghost_mul, kk), _flat(ghost_add, kk)
    out = v.new_zeros((n, c, ho, wo))
    for k in range(kk):
        i, j = divmod(k, kernel_size)
        out.addcmul_(_shifted(vp, i, j, dilation, stride, ho, wo), _filter(attn, m, d, k))
    return out


@native_aggregate.register_fake
def _(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride):
    return v.new_empty((v.shape[0], v.shape[1], attn.shape[2], attn.shape[3]))


@torch.library.custom_op("elsa::native_aggregate_backward", mutates_args=())
def native_aggregate_backward(
    grad: Tensor,
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
    need_v: bool,
    need_attn: bool,
    need_mul: bool,
    need_add: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (v, attn, ghost_mul, ghost_add); an empty tensor stands for one not asked for."""
    n, c, h, w = v.shape
    ho, wo = attn.shape[-2:]
    kk = kernel_size * kernel_size
    pad = kernel_size // 2 * dilation
    vp = F.pad(v, (pad, pad, pad, pad))
    m, d = _flat(ghost_mul, kk), _flat(ghost_add, kk)
    grad = grad.contiguous()

    def empty() -> Tensor:  # a fresh one each time: custom-op outputs may not alias each other
        return v.new_empty(0)

    gvp = v.new_zeros(vp.shape) if need_v else None
    ga = attn.new_empty(attn.shape) if need_attn else empty()
    gm = v.new_empty((n, c, kk)) if need_mul and m is not None else empty()
    gd = v.new_empty((n, c, kk)) if need_add and d is not None else empty()
    need_products = need_attn or gm.numel() > 0 or gd.numel() > 0
    for k in range(kk):
        i, j = divmod(k, kernel_size)
        if need_products:
            gv_k = grad * _shifted(vp, i, j, dilation, stride, ho, wo)  # (N, C, Ho, Wo)
            if need_attn:
                ga[:, k] = gv_k.sum(1) if m is None else torch.einsum("nchw,nc->nhw", gv_k, m[:, :, k])
            if gm.numel():
                gm[:, :, k] = torch.einsum("nchw,nhw->nc", gv_k, attn[:, k])
            if gd.numel():
                gd[:, :, k] = gv_k.sum((2, 3))
        if gvp is not None:
            _shifted(gvp, i, j, dilation, stride, ho, wo).addcmul_(grad, _filter(attn, m, d, k))
    gv = gvp[:, :, pad:pad + h, pad:pad + w].contiguous() if gvp is not None else empty()
    gm = gm.reshape(n, c, kernel_size, kernel_size) if gm.numel() else gm
    gd = gd.reshape(n, c, kernel_size, kernel_size) if gd.numel() else gd
    return gv, ga, gm, gd


@native_aggregate_backward.register_fake
def _(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, need_v, need_attn, need_mul, need_add):
    return (
        v.new_empty(v.shape) if need_v else v.new_empty(0),
        attn.new_empty(attn.shape) if need_attn else v.new_empty(0),
        ghost_mul.new_empty(ghost_mul.shape) if need_mul and ghost_mul is not None else v.new_empty(0),
        ghost_add.new_empty(ghost_add.shape) if need_add and ghost_add is not None else v.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride = inputs
    ctx.save_for_backward(v, attn, ghost_mul, ghost_add)
    ctx.geometry = (kernel_size, dilation, stride)


def _backward(ctx, grad):
    v, attn, ghost_mul, ghost_add = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    gv, ga, gm, gd = native_aggregate_backward(grad, v, attn, ghost_mul, ghost_add, *ctx.geometry, *need)
    grads = [g if wanted and g.numel() else None for g, wanted in zip((gv, ga, gm, gd), need)]
    return (*grads, None, None, None)


native_aggregate.register_autograd(_backward, setup_context=_setup_context)


def aggregate(v, attn, ghost_mul, ghost_add, kernel_size: int, dilation: int, stride: int) -> Tensor:
    return native_aggregate(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
