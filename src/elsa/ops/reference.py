"""The unfold formulation of ELSA aggregation: the oracle every other backend is tested against.

It materialises the (N, C, K*K, Ho, Wo) neighbourhood tensor, so it is slow and memory-hungry, and
deliberately plain: autograd differentiates it, and it runs on any device and dtype.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: int,
    dilation: int,
    stride: int,
) -> Tensor:
    """out[n,c,y,x] = sum_k v[n,c, y*s+(i-K//2)*r, x*s+(j-K//2)*r] * (m[n,c,k] * a[n,k,y,x] + d[n,c,k])."""
    n, c, h, w = v.shape
    ho, wo = attn.shape[-2:]
    kk = kernel_size * kernel_size
    pad = kernel_size // 2 * dilation
    cols = F.unfold(v, kernel_size, dilation=dilation, padding=pad, stride=stride)
    # unfold yields ceil(H / s) positions per axis; the operator keeps the first H // s.
    hu, wu = -(-h // stride), -(-w // stride)
    cols = cols.reshape(n, c, kk, hu, wu)[..., :ho, :wo]
    filters = attn.unsqueeze(1)  # (N, 1, K*K, Ho, Wo)
    if ghost_mul is not None:
        filters = filters * ghost_mul.reshape(n, c, kk, 1, 1)
    if ghost_add is not None:
        filters = filters + ghost_add.reshape(n, c, kk, 1, 1)
    return (cols * filters).sum(2)
