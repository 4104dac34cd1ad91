"""The ELSA attention layer (Hadamard attention + ghost head) and the ELSA transformer block.

Both take and return channels-last maps (B, H, W, C), so they drop into any Swin- or VOLO-style network.
Parameter names, shapes and initialisation follow the official release (spec section 2), so official
checkpoints load into them unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_module, trunc_normal_
from torch import Tensor

from ..ops import elsa_aggregate, elsa_softmax_aggregate
from .cpu_fused import Linear, Mlp, inference_fusable, linear


# Keywords the official Swin stage (BasicLayer) hands to every block of a stage and the official ELSA/ELSABlock
# swallow through **kwargs: they describe window attention, not ELSA. Accepted (and ignored) so that official code
# ports unchanged; any other unknown keyword is an error rather than silently dropped.
OFFICIAL_IGNORED_KWARGS = ("window_size", "shift_size", "input_resolution")


def _check_ignored(owner: str, kwargs: Dict[str, Any]) -> None:
    unknown = sorted(k for k in kwargs if k not in OFFICIAL_IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword argument(s) {unknown}; only the official window-stage "
                        f"keywords {list(OFFICIAL_IGNORED_KWARGS)} are accepted and ignored")


def _qk_dim(dim: int, dim_qk: Optional[int], group_width: int) -> int:
    """Official rule: two thirds of the input width, rounded up to a whole number of groups."""
    d = dim_qk or dim // 3 * 2
    return math.ceil(d / group_width) * group_width


def _fusable(h: Tensor, conv: nn.Conv2d, act: nn.Module) -> bool:
    """Whether oneDNN's fused convolution + GELU may run: CPU float32 inference in eager mode (it has no autograd
    formula, and compilers and exporters should see the plain ops)."""
    return (isinstance(act, nn.GELU) and act.approximate == "none" and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and _HAS_FUSED_CONV and inference_fusable(h, conv.weight, conv.bias))


_HAS_FUSED_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 ``conv`` (official parameter layout, kept for the checkpoints) applied as a matmul to channels-last
    pixels x (..., C_in) -> (..., C_out); the bias added inside the matmul in CPU float32 inference."""
    return linear(x, conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias)


# A leaf for torch.fx (timm's feature extraction): the operator checks its arguments and picks a kernel from the
# tensors' devices and sizes, which symbolic proxies cannot answer.
@register_notrace_module
class ELSA(nn.Module):
    """Enhanced local self-attention.

    The positional order of the arguments is the official ``ELSA``'s, ``(dim, num_heads, dim_qk, dim_v,
    kernel_size, stride, dilation, qkv_bias, qk_scale, attn_drop, proj_drop, group_width, groups, lam, gamma)``,
    so official code ports unchanged; ``backend`` is keyword-only.

    Args:
        dim: input (and output) channels C.
        num_heads: heads G; each head aggregates dim_v // G value channels with its own K x K attention.
        dim_qk, dim_v: widths of q/k and of v (defaults: official rule, and C).
        kernel_size: odd neighbourhood size K.
        stride, dilation: of the aggregation; the output is (B, H // stride, W // stride, C).
        qkv_bias: bias of the 1x1 q/k/v projection.
        qk_scale: scale of the Hadamard product; None means (dim_v // num_heads) ** -0.5.
        attn_drop, proj_drop: dropout after the softmax and after the output projection.
        group_width: channels per group of the grouped K x K conv that turns the Hadamard product into attention.
        groups: groups of the 1x1 conv producing the K*K*G attention logits.
        lam, gamma: ghost-head exponents/scales: filter = m ** lam * attn + d * gamma; 0 disables that ghost.
        backend: force an ``elsa_aggregate`` backend (None: automatic).
        device, dtype: where and in which dtype the parameters are created (timm's factory arguments).
        kwargs: only the official window-stage keywords (``window_size``, ``shift_size``, ``input_resolution``),
            which the official layer also ignores.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_qk: Optional[int] = None,
        dim_v: Optional[int] = None,
        kernel_size: int = 5,
        stride: int = 1,
        dilation: int = 1,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        group_width: int = 8,
        groups: int = 1,
        lam: float = 1.0,
        gamma: float = 1.0,
        *,
        backend: Optional[str] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_ignored(type(self).__name__, kwargs)
        dd = dict(device=device, dtype=dtype)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if stride < 1 or dilation < 1:
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
        self.dim = dim
        self.num_heads = num_heads
        self.dim_v = dim_v or dim
        if self.dim_v % num_heads:
            raise ValueError(f"dim_v ({self.dim_v}) must be divisible by num_heads ({num_heads})")
        self.dim_qk = _qk_dim(dim, dim_qk, group_width)
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.group_width = group_width
        self.lam = lam
        self.gamma = gamma
        self.scale = qk_scale or (self.dim_v // num_heads) ** -0.5
        self.backend = backend

        self.pre_proj = nn.Conv2d(dim, self.dim_qk * 2 + self.dim_v, 1, bias=qkv_bias, **dd)
        self.attn = nn.Sequential(
            nn.Conv2d(self.dim_qk, self.dim_qk, kernel_size, padding=kernel_size // 2 * dilation,
                      dilation=dilation, groups=self.dim_qk // group_width, **dd),
            nn.GELU(),
            nn.Conv2d(self.dim_qk, kernel_size * kernel_size * num_heads, 1, groups=groups, **dd),
        )
        self.ghost_head = self._init_ghost_head(**dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.post_proj = Linear(self.dim_v, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _init_ghost_head(self, device: Optional[torch.device] = None,
                         dtype: Optional[torch.dtype] = None) -> Optional[nn.Parameter]:
        shape = (1, self.dim_v, self.kernel_size, self.kernel_size)
        mul = torch.randn(shape, device=device, dtype=dtype) if self.lam != 0 else None
        add = trunc_normal_(torch.zeros(shape, device=device, dtype=dtype), std=0.02) if self.gamma != 0 else None
        if mul is not None and add is not None:
            return nn.Parameter(torch.stack((mul, add)))  # (2, 1, C, K, K): [0] = m, [1] = d
        if mul is not None or add is not None:
            return nn.Parameter(mul if mul is not None else add)
        return None

    def _apply(self, fn: Any, recurse: bool = True) -> "ELSA":
        """``Module.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D tensor, and a 5-D tensor
        cannot be channels-last: the (2, 1, C, K, K) ghost pair (the official shape, kept for checkpoints and
        optimizer states) goes through the conversion as its (2, C, K, K) view. (``nn.RNNBase`` overrides
        ``_apply`` likewise.) Any other conversion gives the same result either way."""
        if self.ghost_head is None or self.ghost_head.dim() != 5:
            return super()._apply(fn, recurse)

        def as_4d(t: Tensor) -> Tensor:
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]) if t.dim() == 5 else fn(t)

        return super()._apply(as_4d, recurse)

    def ghosts(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(m ** lam, d * gamma), each (G, C//G, K, K) (one per head, shared by the batch) or None."""
        if self.ghost_head is None:
            return None, None
        if self.lam != 0 and self.gamma != 0:
            mul, add = self.ghost_head[0], self.ghost_head[1]
        elif self.lam != 0:
            mul, add = self.ghost_head, None
        else:
            mul, add = None, self.ghost_head
        if mul is not None and self.lam != 1:
            mul = mul ** self.lam
        if add is not None and self.gamma != 1:
            add = add * self.gamma
        k, g = self.kernel_size, self.num_heads
        shape = (g, self.dim_v // g, k, k)
        return tuple(None if t is None else t.reshape(shape) for t in (mul, add))

    def attention_logits(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> Hadamard-attention logits (B, G*K*K, H // stride, W // stride)."""
        q, k, _ = self.pre_proj(x).split((self.dim_qk, self.dim_qk, self.dim_v), dim=1)
        return self._logits(q, k)

    def _logits(self, q: Tensor, k: Tensor) -> Tensor:
        h = q * k if self.scale == 1 else q * k * self.scale
        if self.stride > 1:
            h = F.avg_pool2d(h, self.stride)
        h = self._conv_gelu(h)
        # the logits come out with the K*K neighbours of each head contiguous, which is how the compiled CPU kernel
        # reads them (no reshaping copy)
        conv = self.attn[2]
        if conv.groups != 1:
            return conv(h)
        return _pointwise(conv, h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _conv_gelu(self, h: Tensor) -> Tensor:
        """GELU(grouped K x K conv(h)). In CPU inference through oneDNN's convolution with the GELU fused in (the
        op inductor uses): 7.0 against 10.0 ms at ELSA-Swin-T stage 1, batch 4, one thread; same values to 5e-7."""
        conv, act = self.attn[0], self.attn[1]
        if _fusable(h, conv, act):
            return torch.ops.mkldnn._convolution_pointwise(h, conv.weight, conv.bias, list(conv.padding),
                                                           list(conv.stride), list(conv.dilation), conv.groups,
                                                           "gelu", [], "none")
        return act(conv(h))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H // stride, W // stride, C)."""
        # q, k and v stay strided views of the projection's channels-last output, and the head-aware operator reads
        # v and the logits through their strides and writes channels-last: no layout copy between the projections
        # (ELSA-Swin-T's forward asked for 43 copies before, 3 now: benchmarks/copy_count.py).
        qkv = _pointwise(self.pre_proj, x).permute(0, 3, 1, 2)
        q, k, v = qkv.split((self.dim_qk, self.dim_qk, self.dim_v), dim=1)
        logits = self._logits(q, k)
        # under autocast v is half precision while the ghost parameters stay float32: the op wants one dtype
        mul, add = (None if t is None else t.to(v.dtype) for t in self.ghosts())
        logits = logits.to(v.dtype)
        geometry = dict(kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride,
                        num_heads=self.num_heads, backend=self.backend)
        if self.training and self.attn_drop.p > 0:
            b, _, ho, wo = logits.shape
            attn = logits.reshape(b, self.num_heads, -1, ho, wo).softmax(dim=2).reshape(logits.shape)
            out = elsa_aggregate(v, self.attn_drop(attn), mul, add, **geometry)
        else:  # the softmax can be fused into the aggregation
            out = elsa_softmax_aggregate(v, logits, mul, add, **geometry)
        return self.proj_drop(self.post_proj(out.permute(0, 2, 3, 1)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, lam={self.lam}, gamma={self.gamma}, scale={self.scale:g}")


class ELSABlock(nn.Module):
    """x + DropPath(ELSA(LN(x))), then x + DropPath(MLP(LN(x))); input and output (B, H, W, C).

    Arguments, their positional order and defaults are the official ``ELSABlock``'s: ``(dim, kernel_size, stride,
    num_heads, mlp_ratio, drop, attn_drop, drop_path, act_layer, norm_layer, qkv_bias, qk_scale, dim_qk, dim_v,
    lam, gamma, dilation, group_width, groups)`` (MLP ratio 3, no qkv bias, qk_scale 1, lam = gamma = 1); ELSA-Swin
    passes its own (MLP ratio 4, qkv bias, K = 7, lam = 0). ``backend``, ``device`` and ``dtype`` (where the
    parameters are created, timm's factory arguments) are keyword-only.

    ``drop`` is the official block's dropout: in the MLP only (after its activation and after its output layer);
    the official block never drops the ELSA output projection. ``stride`` must be 1 (the residual needs the input
    size), as the official block asserts.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 5,
        stride: int = 1,
        num_heads: int = 1,
        mlp_ratio: float = 3.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = 1.0,
        dim_qk: Optional[int] = None,
        dim_v: Optional[int] = None,
        lam: float = 1.0,
        gamma: float = 1.0,
        dilation: int = 1,
        group_width: int = 8,
        groups: int = 1,
        *,
        backend: Optional[str] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_ignored(type(self).__name__, kwargs)
        if stride != 1:
            raise ValueError(f"stride must be 1 in an ELSABlock (the residual keeps the input size), got {stride}")
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = ELSA(dim, num_heads, dim_qk=dim_qk, dim_v=dim_v, kernel_size=kernel_size, stride=stride,
                         dilation=dilation, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         group_width=group_width, groups=groups, lam=lam, gamma=gamma, backend=backend, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
