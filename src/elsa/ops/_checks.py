"""Argument validation for the ELSA operator.

Every public entry point calls :func:`check_aggregate_args` once, where user input enters; the backends may
then assume well-formed tensors. Messages name the argument, what came and what was expected.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_tensor(name: str, t: object, rank: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    return t


def output_size(size: int, stride: int) -> int:
    """Output extent of one spatial axis: ``size // stride`` (spec section 1)."""
    return size // stride


def check_aggregate_args(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor],
    ghost_add: Optional[Tensor],
    kernel_size: Optional[int],
    dilation: int,
    stride: int,
    num_heads: Optional[int] = None,
) -> int:
    """Validate the operator's arguments and return the resolved kernel size.

    Flat form (num_heads None): v (N, C, H, W); attn (N, K*K, H // stride, W // stride); ghosts (N, C, K, K).
    Head-aware form (num_heads G): v (B, G*C, H, W); attn (B, G*K*K, H // stride, W // stride); ghosts (G, C, K, K).
    """
    _check_tensor("v", v, 4)
    _check_tensor("attn", attn, 4)
    dilation = _positive_int("dilation", dilation)
    stride = _positive_int("stride", stride)
    heads = 1 if num_heads is None else _positive_int("num_heads", num_heads)
    for name, t in (("v", v), ("attn", attn)):
        if t.shape[1] % heads:
            raise ValueError(f"{name} must have a multiple of num_heads = {heads} channels, got {t.shape[1]} "
                             f"({name} shape {tuple(t.shape)})")

    kk = attn.shape[1] // heads
    per_head = "" if num_heads is None else " per head"
    if kernel_size is None:
        root = math.isqrt(kk)
        if root * root != kk:
            raise ValueError(
                f"attn has {kk} channels{per_head}, which is not a square K*K; pass kernel_size explicitly")
        kernel_size = root
    kernel_size = _positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kk != kernel_size * kernel_size:
        raise ValueError(
            f"attn must have kernel_size**2 = {kernel_size * kernel_size} channels{per_head}, got {kk} "
            f"(attn shape {tuple(attn.shape)})")

    n, c, h, w = v.shape
    c //= heads
    if n == 0 or c == 0:
        raise ValueError(f"v must have a non-empty batch and channel axis, got shape {tuple(v.shape)}")
    ho, wo = output_size(h, stride), output_size(w, stride)
    if ho < 1 or wo < 1:
        raise ValueError(f"v's spatial size {h}x{w} is smaller than stride {stride}")
    expected_attn = (n, heads * kk, ho, wo)
    if tuple(attn.shape) != expected_attn:
        form = "(N, K*K, H//stride, W//stride)" if num_heads is None else "(B, G*K*K, H//stride, W//stride)"
        raise ValueError(
            f"attn must have shape {form} = {expected_attn} for v of shape {tuple(v.shape)}, got {tuple(attn.shape)}")

    expected_ghost = (n, c, kernel_size, kernel_size) if num_heads is None else (heads, c, kernel_size, kernel_size)
    ghost_form = "(N, C, K, K)" if num_heads is None else "(G, C, K, K)"
    for name, g in (("ghost_mul", ghost_mul), ("ghost_add", ghost_add)):
        if g is None:
            continue
        _check_tensor(name, g, 4)
        if tuple(g.shape) != expected_ghost:
            raise ValueError(f"{name} must have shape {ghost_form} = {expected_ghost}, got {tuple(g.shape)}")

    for name, t in (("attn", attn), ("ghost_mul", ghost_mul), ("ghost_add", ghost_add)):
        if t is None:
            continue
        if t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}; all tensors must share a device")
        if t.dtype != v.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but v has dtype {v.dtype}; all tensors must share a dtype")
    return kernel_size
