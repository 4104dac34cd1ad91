"""Pieces every backend's torch.library registration shares: fake (shape-only) implementations and the autograd
glue between a forward op ``(v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride)`` and its backward op
``(grad, v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, *extra, need_v, need_attn, need_mul,
need_add) -> 4 tensors``, in which an empty tensor stands for a gradient that was not asked for."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def fake_forward(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
                 kernel_size: int, dilation: int, stride: int) -> Tensor:
    return v.new_empty((v.shape[0], v.shape[1], attn.shape[2], attn.shape[3]))


def fake_gradients(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
                   need_v: bool, need_attn: bool, need_mul: bool, need_add: bool) -> tuple[Tensor, ...]:
    """Fresh tensors each: custom-op outputs may not alias each other."""
    return (
        v.new_empty(v.shape) if need_v else v.new_empty(0),
        attn.new_empty(attn.shape) if need_attn else v.new_empty(0),
        ghost_mul.new_empty(ghost_mul.shape) if need_mul and ghost_mul is not None else v.new_empty(0),
        ghost_add.new_empty(ghost_add.shape) if need_add and ghost_add is not None else v.new_empty(0),
    )


def setup_context(ctx, inputs, output) -> None:
    """Saves the four tensors; the non-tensor arguments after them (kernel_size, dilation, stride, and any an op
    adds) are passed back to the backward op in order."""
    v, attn, ghost_mul, ghost_add, *geometry = inputs
    ctx.save_for_backward(v, attn, ghost_mul, ghost_add)
    ctx.geometry = tuple(geometry)


def make_backward(backward_op: Callable[..., tuple[Tensor, ...]], *extra: object) -> Callable:
    """The autograd formula that calls ``backward_op`` for the gradients the inputs need."""

    def backward(ctx, grad):
        v, attn, ghost_mul, ghost_add = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        grads = backward_op(grad, v, attn, ghost_mul, ghost_add, *ctx.geometry, *extra, *need)
        grads = [g if wanted and g.numel() else None for g, wanted in zip(grads, need)]
        return (*grads, *(None for _ in ctx.geometry))

    return backward


# ---------------------------------------------------------------------------------------------------------
# head-aware ops: (v (B, G*C, H, W), attn (B, G*K*K, Ho, Wo), ghosts (G, C, K, K) or (B, G, C, K, K), ...,
# num_heads) with channels-last outputs


def channels_last_empty(like: Tensor, b: int, channels: int, h: int, w: int, dtype=None) -> Tensor:
    """An uninitialised (b, channels, h, w) tensor with channels-last strides: its ``permute(0, 2, 3, 1)`` is the
    contiguous (b, h, w, channels) map a following projection reads."""
    return like.new_empty((b, h, w, channels), dtype=dtype).permute(0, 3, 1, 2)


def fake_heads_forward(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
                       kernel_size: int, dilation: int, stride: int, num_heads: int = 1) -> Tensor:
    return channels_last_empty(v, v.shape[0], v.shape[1], attn.shape[2], attn.shape[3])


def fake_heads_gradients(v: Tensor, attn: Tensor, ghost_mul: Optional[Tensor], ghost_add: Optional[Tensor],
                         need_v: bool, need_attn: bool, need_mul: bool, need_add: bool) -> tuple[Tensor, ...]:
    """Gradients of a head-aware op: channels-last for v and the attention, the ghosts' own shapes."""
    b, gc, h, w = v.shape
    return (
        channels_last_empty(v, b, gc, h, w) if need_v else v.new_empty(0),
        channels_last_empty(attn, b, attn.shape[1], attn.shape[2], attn.shape[3]) if need_attn else v.new_empty(0),
        ghost_mul.new_empty(ghost_mul.shape) if need_mul and ghost_mul is not None else v.new_empty(0),
        ghost_add.new_empty(ghost_add.shape) if need_add and ghost_add is not None else v.new_empty(0),
    )
