"""ELSA aggregation written in standard tensor ops only, for exporters: the ONNX exporters (TorchScript-based and
dynamo-based) know nothing of the ``elsa::*`` custom ops, so while ``torch.onnx.is_in_onnx_export()`` the dispatcher
runs this instead.

It is the shift-and-accumulate form (no (N, C, K*K, H*W) neighbourhood tensor): K*K strided slices of the padded
input, each multiplied by its neighbour's attention (and ghost terms) and summed. Slices are bounded relative to the
padded map's end, never by Python integers taken from a shape, so batch, height and width stay dynamic in the
exported graph.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def aggregate(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
              kernel_size: int, dilation: int, stride: int, num_heads: int, softmax: bool) -> Tensor:
    """Head-aware form: v (B, G*C, H, W), attn (B, G*K*K, Ho, Wo), ghosts (G, C, K, K) or (B, G, C, K, K) or
    None -> (B, G*C, Ho, Wo)."""
    k, g = kernel_size, num_heads
    kk, pad = k * k, k // 2 * dilation
    c = v.shape[1] // g
    a = attn.unflatten(1, (g, 1, kk))  # (B, G, 1, K*K, Ho, Wo)
    if softmax:
        a = a.softmax(3)
    vp = F.pad(v, (pad, pad, pad, pad)).unflatten(1, (g, c))  # (B, G, C, H + 2p, W + 2p)

    def ghost(t: Optional[Tensor], index: int) -> Optional[Tensor]:  # (1 or B, G, C, 1, 1)
        if t is None:
            return None
        t = t.flatten(-2)[..., index]
        return (t if t.dim() == 3 else t.unsqueeze(0)).unsqueeze(-1).unsqueeze(-1)

    out = None
    for index in range(kk):
        i, j = divmod(index, k)
        y0, x0 = i * dilation, j * dilation
        # rows y0, y0 + s, ... up to 2p before the end: ceil(H / s) of them; the operator keeps the first H // s,
        # which is what the attention's own size says (narrow to it, read from the tensor, stays symbolic)
        rows = vp[..., y0:y0 - 2 * pad if y0 < 2 * pad else None:stride,
                  x0:x0 - 2 * pad if x0 < 2 * pad else None:stride]
        if stride > 1:
            rows = rows[..., :attn.shape[-2], :attn.shape[-1]]
        weight = a[:, :, :, index]  # (B, G, 1, Ho, Wo)
        m, d = ghost(ghost_mul, index), ghost(ghost_add, index)
        if m is not None:
            weight = weight * m
        if d is not None:
            weight = weight + d
        term = rows * weight
        out = term if out is None else out + term
    return out.flatten(1, 2)
