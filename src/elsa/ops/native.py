"""Memory-efficient PyTorch ELSA aggregation with a hand-written backward.

The unfold formulation materialises an (N, C, K*K, Ho, Wo) tensor. Here the operator is split in two:

- the additive ghost term sum_k v_k * d_k is a depthwise convolution of v with weights d (spec section 1), run
  by PyTorch's convolution (forward and ``convolution_backward``);
- the attention term sum_k v_k * (m_k * a_k) is accumulated one shifted view of the zero-padded input at a
  time, so the largest temporary is one (N, C, Ho, Wo) map; its gradients are sums of the same shifted
  products and are accumulated in the same loop.

Registered as the custom ops ``elsa::native_aggregate`` / ``elsa::native_aggregate_backward`` with fake
implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._custom_op import fake_forward, fake_gradients, make_backward, setup_context


def _shifted(padded: Tensor, i: int, j: int, dilation: int, stride: int, ho: int, wo: int) -> Tensor:
    """View of ``padded`` (N, C, H+2p, W+2p) holding neighbour (i, j) of every output position."""
    y0, x0 = i * dilation, j * dilation
    return padded[:, :, y0:y0 + (ho - 1) * stride + 1:stride, x0:x0 + (wo - 1) * stride + 1:stride]


def _attn_filter(attn: Tensor, m: Optional[Tensor], k: int) -> Tensor:
    """Per-neighbour attention filter m_k * a_k, shape (N, 1 or C, Ho, Wo)."""
    a = attn[:, k:k + 1]
    return a if m is None else a * m[:, :, k, None, None]


def _flat(g: Optional[Tensor], kk: int) -> Optional[Tensor]:
    return None if g is None else g.reshape(g.shape[0], g.shape[1], kk)


# The K*K loop re-reads and re-writes one map per neighbour. Running it on a few batch rows at a time keeps
# those maps in cache instead of streaming them from memory 49 times: at ELSA-Swin-T stage 1 (batch 8) forward+
# backward took 0.14 s with 4 MiB chunks, 0.15 s with 1 MiB, 0.24 s unchunked (2-core CPU, 2026-11-21).
_CHUNK_BYTES = 1 << 22


def _batch_chunks(t: Tensor) -> list[slice]:
    """Slices of the batch axis whose (C, Ho, Wo) maps total about _CHUNK_BYTES."""
    per_row = max(1, t[0].numel() * t.element_size())
    step = max(1, _CHUNK_BYTES // per_row)
    return [slice(i, min(i + step, t.shape[0])) for i in range(0, t.shape[0], step)]


def _depthwise_args(v: Tensor, d: Tensor, kernel_size: int, dilation: int, stride: int):
    """v and d as one batch of N*C single-channel images and filters, and the convolution's geometry."""
    n, c, h, w = v.shape
    pad = kernel_size // 2 * dilation
    return (v.reshape(1, n * c, h, w), d.reshape(n * c, 1, kernel_size, kernel_size),
            dict(stride=[stride] * 2, padding=[pad] * 2, dilation=[dilation] * 2, groups=n * c))


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
    if ghost_add is not None:
        x, weight, geo = _depthwise_args(v, ghost_add, kernel_size, dilation, stride)
        # the convolution yields ceil(H / s) rows; the operator keeps H // s
        out = F.conv2d(x, weight, **geo)[..., :ho, :wo].reshape(n, c, ho, wo).contiguous()
    else:
        out = v.new_zeros((n, c, ho, wo))
    m = _flat(ghost_mul, kk)
    for rows in _batch_chunks(out):
        vp = F.pad(v[rows], (pad, pad, pad, pad))
        acc, a, mc = out[rows], attn[rows], None if m is None else m[rows]
        for k in range(kk):
            i, j = divmod(k, kernel_size)
            acc.addcmul_(_shifted(vp, i, j, dilation, stride, ho, wo), _attn_filter(a, mc, k))
    return out


native_aggregate.register_fake(fake_forward)


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
    m = _flat(ghost_mul, kk)
    grad = grad.contiguous()

    def empty() -> Tensor:  # a fresh one each time: custom-op outputs may not alias each other
        return v.new_empty(0)

    gv = v.new_empty(v.shape) if need_v else empty()
    ga = attn.new_empty(attn.shape) if need_attn else empty()
    gm = v.new_empty((n, c, kk)) if need_mul and m is not None else empty()
    gd = v.new_empty((n, c, kk)) if need_add and ghost_add is not None else empty()
    for rows in _batch_chunks(grad):
        g, a, mc = grad[rows], attn[rows], None if m is None else m[rows]
        vp = F.pad(v[rows], (pad, pad, pad, pad))
        gvp = torch.zeros_like(vp) if need_v else None
        for k in range(kk):
            i, j = divmod(k, kernel_size)
            if need_attn or gm.numel() or gd.numel():
                gv_k = g * _shifted(vp, i, j, dilation, stride, ho, wo)  # (rows, C, Ho, Wo)
                if need_attn:
                    ga[rows, k] = gv_k.sum(1) if mc is None else torch.einsum("nchw,nc->nhw", gv_k, mc[:, :, k])
                if gm.numel():
                    gm[rows, :, k] = torch.einsum("nchw,nhw->nc", gv_k, a[:, k])
                if gd.numel():  # the depthwise conv's weight gradient: much faster here than convolution_backward's
                    gd[rows, :, k] = gv_k.sum((2, 3))
            if gvp is not None:
                _shifted(gvp, i, j, dilation, stride, ho, wo).addcmul_(g, _attn_filter(a, mc, k))
        if gvp is not None:
            gv[rows] = gvp[:, :, pad:pad + h, pad:pad + w]
    if ghost_add is not None and need_v:
        x, weight, geo = _depthwise_args(v, ghost_add, kernel_size, dilation, stride)
        full = ((h + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1,
                (w + 2 * pad - dilation * (kernel_size - 1) - 1) // stride + 1)
        g_full = F.pad(grad, (0, full[1] - wo, 0, full[0] - ho)).reshape(1, n * c, *full)
        gx, _, _ = torch.ops.aten.convolution_backward(
            g_full, x, weight, None, geo["stride"], geo["padding"], geo["dilation"], False, [0, 0], geo["groups"],
            [True, False, False])
        gv += gx.reshape(n, c, h, w)
    gm = gm.reshape(n, c, kernel_size, kernel_size) if gm.numel() else gm
    gd = gd.reshape(n, c, kernel_size, kernel_size) if gd.numel() else gd
    return gv, ga, gm, gd


@native_aggregate_backward.register_fake
def _(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, need_v, need_attn, need_mul, need_add):
    return fake_gradients(v, attn, ghost_mul, ghost_add, need_v, need_attn, need_mul, need_add)


native_aggregate.register_autograd(make_backward(native_aggregate_backward), setup_context=setup_context)


def aggregate(v, attn, ghost_mul, ghost_add, kernel_size: int, dilation: int, stride: int) -> Tensor:
    return native_aggregate(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
