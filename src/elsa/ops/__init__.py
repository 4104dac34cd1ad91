"""The ELSA operator: spatial aggregation of values with Hadamard attention and a ghost head.

``elsa_aggregate`` checks its arguments once, picks a backend from one table and calls it. Backends:

- ``reference``: unfold formulation, the oracle (any device, autograd).
- ``native``: memory-efficient PyTorch with its own backward (default on CPU; on CUDA when Triton is absent).
- ``triton``: fused GPU kernels (default on CUDA when Triton is importable).

A backend is picked automatically from the tensors' device, or forced with ``backend=`` or the
``ELSA_BACKEND`` environment variable (read at call time). A forced backend that cannot run raises with
the reason; automatic selection skips it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import native, reference
from ._checks import check_aggregate_args, output_size

__all__ = ["elsa_aggregate", "elsa_softmax_aggregate", "BACKENDS", "select_backend", "output_size"]

# signature of a backend's aggregate: (v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride) -> out
AggregateFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Backend:
    """One implementation of the operator.

    why_not(v) returns None when the backend can run on tensors like ``v``, else the reason.
    auto_devices lists the device types on which automatic selection may pick it.
    softmax_aggregate, when set, fuses the softmax over the K*K neighbours into the aggregation.
    """
    name: str
    why_not: Callable[[Tensor], Optional[str]]
    aggregate: Callable[[], AggregateFn]
    auto_devices: tuple[str, ...]
    softmax_aggregate: Optional[Callable[[], AggregateFn]] = None


def _any_device(v: Tensor) -> Optional[str]:
    return None


def _triton_why_not(v: Tensor) -> Optional[str]:
    from .triton import why_not  # imports triton lazily; absent triton is a reason, not an error

    return why_not(v)


def _triton_aggregate() -> AggregateFn:
    from .triton.op import aggregate

    return aggregate


def _triton_softmax_aggregate() -> AggregateFn:
    from .triton.op import softmax_aggregate

    return softmax_aggregate


# Priority order for automatic selection: the first backend that can run wins.
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", _triton_why_not, _triton_aggregate, auto_devices=("cuda",),
                      softmax_aggregate=_triton_softmax_aggregate),
    "native": Backend("native", _any_device, lambda: native.aggregate, auto_devices=("cpu", "cuda", "meta")),
    "reference": Backend("reference", _any_device, lambda: reference.aggregate, auto_devices=()),
}


def select_backend(v: Tensor, backend: Optional[str] = None) -> Backend:
    """The backend that will run for ``v``: the forced one (argument, then ``ELSA_BACKEND``) or the first automatic one."""
    name = backend if backend is not None else os.environ.get("ELSA_BACKEND") or None
    if name is not None and name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        chosen = BACKENDS[name]
        reason = chosen.why_not(v)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on tensors on {v.device} ({v.dtype}): {reason}")
        return chosen
    for candidate in BACKENDS.values():
        if v.device.type in candidate.auto_devices and candidate.why_not(v) is None:
            return candidate
    return BACKENDS["reference"]


def elsa_aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor] = None,
    ghost_add: Optional[Tensor] = None,
    *,
    kernel_size: Optional[int] = None,
    dilation: int = 1,
    stride: int = 1,
    backend: Optional[str] = None,
) -> Tensor:
    """Aggregate ``v`` over each output position's K x K neighbourhood (spec section 1).

    out[n,c,y,x] = sum_{i,j} v[n,c, y*s+(i-K//2)*r, x*s+(j-K//2)*r] * (m[n,c,i,j] * attn[n,i*K+j,y,x] + d[n,c,i,j])

    Args:
        v: (N, C, H, W) values; N is batch * heads, C channels per head.
        attn: (N, K*K, H // stride, W // stride) attention over the neighbours (already normalised).
        ghost_mul: (N, C, K, K) multiplicative ghost ``m``, or None for m = 1.
        ghost_add: (N, C, K, K) additive ghost ``d``, or None for d = 0.
        kernel_size: odd K; defaults to sqrt(attn.shape[1]).
        dilation, stride: r >= 1 and s >= 1.
        backend: None (automatic), "reference", "native" or "triton".

    Returns:
        (N, C, H // stride, W // stride), dtype of ``v``.
    """
    kernel_size = check_aggregate_args(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
    impl = select_backend(v, backend).aggregate()
    return impl(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)


def elsa_softmax_aggregate(
    v: Tensor,
    attn_logits: Tensor,
    ghost_mul: Optional[Tensor] = None,
    ghost_add: Optional[Tensor] = None,
    *,
    kernel_size: Optional[int] = None,
    dilation: int = 1,
    stride: int = 1,
    backend: Optional[str] = None,
) -> Tensor:
    """``elsa_aggregate(v, attn_logits.softmax(1), ...)``; backends that can fuse the softmax never write it out.

    attn_logits: (N, K*K, H // stride, W // stride) unnormalised attention; other arguments as ``elsa_aggregate``.
    """
    kernel_size = check_aggregate_args(v, attn_logits, ghost_mul, ghost_add, kernel_size, dilation, stride)
    chosen = select_backend(v, backend)
    if chosen.softmax_aggregate is not None:
        return chosen.softmax_aggregate()(v, attn_logits, ghost_mul, ghost_add, kernel_size, dilation, stride)
    attn = torch.softmax(attn_logits, dim=1)
    return chosen.aggregate()(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
