"""The ELSA operator: spatial aggregation of values with Hadamard attention and a ghost head.

``elsa_aggregate`` checks its arguments once, picks a backend from one table and calls it. Backends:

- ``reference``: unfold formulation, the oracle (any device, autograd).
- ``native``: memory-efficient PyTorch with its own backward (on CPU when the compiled kernel cannot run; on CUDA
  when Triton is absent).
- ``cpp``: a C++/OpenMP kernel built once per machine at first use (default on CPU).
- ``triton``: fused GPU kernels (default on CUDA when Triton is importable).

A backend is picked automatically from the tensors' device, or forced with ``backend=`` or the
``ELSA_BACKEND`` environment variable (read at call time). A forced backend that cannot run raises with
the reason; automatic selection skips it and logs the reason once. While an ONNX exporter traces, the operator is
written in standard ops instead (``decomposed``), whatever the backend.

With ``num_heads=G`` both entry points are head-aware: ``v`` is (B, G*C, H, W) and the attention
(B, G*K*K, Ho, Wo), as a projection writes them (channels-last strides are read as they are), and the ghosts
are (G, C, K, K), one for the whole batch. ``cpp`` and ``triton`` have head-aware kernels, which take this
without a copy and write channels-last outputs; ``native`` and ``reference`` get flattened copies.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import decomposed, native, reference
from ._checks import check_aggregate_args, output_size
from .cpp import op as _cpp_op  # noqa: F401 - registers elsa::cpp_aggregate (nothing is built until it runs)

__all__ = ["elsa_aggregate", "elsa_softmax_aggregate", "BACKENDS", "select_backend", "output_size"]

# signature of a backend's aggregate: (v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride) -> out
AggregateFn = Callable[..., Tensor]
# signature of a head-aware aggregate: (v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads,
# softmax) -> out, with v (B, G*C, H, W), attn (B, G*K*K, Ho, Wo), ghosts (G, C, K, K) or (B, G, C, K, K)
HeadsAggregateFn = Callable[..., Tensor]

_log = logging.getLogger(__name__)
_logged_reasons: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Backend:
    """One implementation of the operator.

    why_not(v) returns None when the backend can run on tensors like ``v``, else the reason.
    auto_devices lists the device types on which automatic selection may pick it.
    softmax_aggregate, when set, fuses the softmax over the K*K neighbours into the aggregation.
    heads_aggregate, when set, is one head-aware call that does everything (both entry points, fused softmax);
    the other fields are then unused.
    """
    name: str
    why_not: Callable[[Tensor], Optional[str]]
    aggregate: Callable[[], AggregateFn]
    auto_devices: tuple[str, ...]
    softmax_aggregate: Optional[Callable[[], AggregateFn]] = None
    heads_aggregate: Optional[Callable[[], HeadsAggregateFn]] = None


def _any_device(v: Tensor) -> Optional[str]:
    return None


def _triton_why_not(v: Tensor) -> Optional[str]:
    from .triton import why_not  # imports triton lazily; absent triton is a reason, not an error

    return why_not(v)


def _cpp_why_not(v: Tensor) -> Optional[str]:
    from .cpp import why_not  # builds the kernel on first use; failure is a reason, not an error

    return why_not(v)


def _triton_heads_aggregate() -> HeadsAggregateFn:
    from .triton.op import heads_aggregate

    return heads_aggregate


# Priority order for automatic selection: the first backend that can run wins.
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", _triton_why_not, _triton_heads_aggregate, auto_devices=("cuda",),
                      heads_aggregate=_triton_heads_aggregate),
    "cpp": Backend("cpp", _cpp_why_not, lambda: _cpp_op.cpp_aggregate, auto_devices=("cpu",),
                   heads_aggregate=lambda: _cpp_op.cpp_aggregate),
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
        if v.device.type not in candidate.auto_devices:
            continue
        reason = candidate.why_not(v)
        if reason is None:
            return candidate
        if (candidate.name, reason) not in _logged_reasons:
            _logged_reasons.add((candidate.name, reason))
            _log.info("ELSA backend %r skipped: %s", candidate.name, reason)
    return BACKENDS["reference"]


def _run(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor], kernel_size: int,
         dilation: int, stride: int, num_heads: Optional[int], softmax: bool, backend: Optional[str]) -> Tensor:
    """Dispatch checked arguments to the chosen backend, adapting between the flat and the head-aware forms."""
    chosen = None if torch.onnx.is_in_onnx_export() else select_backend(v, backend)
    if chosen is None or chosen.heads_aggregate is not None:
        # The head-aware implementations take the flat form as one head per sample, with per-sample ghosts.
        heads = 1 if num_heads is None else num_heads
        mul, add = ((ghost_mul, ghost_add) if num_heads is not None else
                    (None if g is None else g.unsqueeze(1) for g in (ghost_mul, ghost_add)))
        # ONNX knows no custom op: while an exporter traces, standard ops only (ops/decomposed.py)
        impl = decomposed.aggregate if chosen is None else chosen.heads_aggregate()
        out = impl(v, attn, mul, add, kernel_size, dilation, stride, heads, softmax)
        # the flat form's result follows v's memory format, as PyTorch's own ops do
        return out if num_heads is not None or v.stride(1) == 1 else out.contiguous()
    if num_heads is not None:  # head-aware call on a flat backend: flatten (copies), then restore the heads
        b, gc, h, w = v.shape
        ho, wo = attn.shape[-2:]
        v = v.reshape(b * num_heads, gc // num_heads, h, w)
        attn = attn.reshape(b * num_heads, -1, ho, wo)
        ghost_mul, ghost_add = (None if g is None else g.expand(b, *g.shape).reshape(-1, *g.shape[1:])
                                for g in (ghost_mul, ghost_add))
    if softmax and chosen.softmax_aggregate is not None:
        out = chosen.softmax_aggregate()(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
    else:
        attn = torch.softmax(attn, dim=1) if softmax else attn
        out = chosen.aggregate()(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)
    return out if num_heads is None else out.reshape(b, gc, *out.shape[-2:])


def elsa_aggregate(
    v: Tensor,
    attn: Tensor,
    ghost_mul: Optional[Tensor] = None,
    ghost_add: Optional[Tensor] = None,
    *,
    kernel_size: Optional[int] = None,
    dilation: int = 1,
    stride: int = 1,
    num_heads: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Aggregate ``v`` over each output position's K x K neighbourhood (spec section 1).

    out[n,c,y,x] = sum_{i,j} v[n,c, y*s+(i-K//2)*r, x*s+(j-K//2)*r] * (m[n,c,i,j] * attn[n,i*K+j,y,x] + d[n,c,i,j])

    Args:
        v: (N, C, H, W) values; N is batch * heads, C channels per head.
            With ``num_heads=G``: (B, G*C, H, W), read through its strides (channels-last needs no copy).
        attn: (N, K*K, H // stride, W // stride) attention over the neighbours (already normalised).
            With ``num_heads``: (B, G*K*K, H // stride, W // stride), head g's neighbours at g*K*K + k.
        ghost_mul: (N, C, K, K) multiplicative ghost ``m``, or None for m = 1. With ``num_heads``: (G, C, K, K),
            shared by the batch (its gradient is summed over the batch).
        ghost_add: (N, C, K, K) additive ghost ``d``, or None for d = 0. With ``num_heads``: (G, C, K, K).
        kernel_size: odd K; defaults to sqrt(attn.shape[1]) (sqrt(attn.shape[1] / G) with heads).
        dilation, stride: r >= 1 and s >= 1.
        num_heads: None for the flat form above, or G for the head-aware form.
        backend: None (automatic), "reference", "native", "cpp" or "triton".

    Returns:
        (N, C, H // stride, W // stride), or (B, G*C, H // stride, W // stride) with ``num_heads``; dtype of ``v``.
        The head-aware form returns channels-last strides on the ``cpp`` and ``triton`` backends, so that
        ``out.permute(0, 2, 3, 1)`` is contiguous.
    """
    kernel_size = check_aggregate_args(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads)
    return _run(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, False, backend)


def elsa_softmax_aggregate(
    v: Tensor,
    attn_logits: Tensor,
    ghost_mul: Optional[Tensor] = None,
    ghost_add: Optional[Tensor] = None,
    *,
    kernel_size: Optional[int] = None,
    dilation: int = 1,
    stride: int = 1,
    num_heads: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``elsa_aggregate(v, softmax(attn_logits) over each head's K*K neighbours, ...)``; backends that can fuse
    the softmax never write it out.

    attn_logits: (N, K*K, H // stride, W // stride) unnormalised attention (with ``num_heads``:
    (B, G*K*K, H // stride, W // stride)); other arguments as ``elsa_aggregate``.
    """
    kernel_size = check_aggregate_args(v, attn_logits, ghost_mul, ghost_add, kernel_size, dilation, stride,
                                       num_heads)
    return _run(v, attn_logits, ghost_mul, ghost_add, kernel_size, dilation, stride, num_heads, True, backend)
