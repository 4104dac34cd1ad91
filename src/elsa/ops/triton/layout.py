"""How the Triton launchers address the head-aware operands: the ghosts' (batch, head) strides and the float32
buffers their gradients are reduced into (``kernels._sample`` does the addressing inside the kernels)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def ghost_strides(ghost: Optional[Tensor], num_heads: int) -> tuple[int, int, int, int, int]:
    """(batch, head, channel, row, column) strides of a ghost (G, C, K, K), shared by the batch (batch stride 0),
    or (B, G, C, K, K) per sample; zeros for None."""
    if ghost is None:
        return (0, 0, 0, 0, 0)
    if ghost.dim() not in (4, 5) or ghost.shape[-4] != num_heads:
        raise ValueError(f"ghost must be (G, C, K, K) or (B, G, C, K, K) with G = num_heads = {num_heads}, "
                         f"got {tuple(ghost.shape)}")
    return (0, *ghost.stride()) if ghost.dim() == 4 else tuple(ghost.stride())


def ghost_grad_rows(ghosts: tuple[Optional[Tensor], ...], b: int, num_heads: int, c: int, kk: int
                    ) -> tuple[int, int]:
    """(rows, batch stride) of the float32 (rows, G, C, K*K) buffers the kernels add ghost gradients into: one
    row for ghosts shared by the batch (batch stride 0, the batch is reduced by the atomic adds), B rows when a
    ghost is per sample."""
    per_sample = any(t is not None and t.dim() == 5 for t in ghosts)
    return (b, num_heads * c * kk) if per_sample else (1, 0)


def ghost_grad(buffer: Optional[Tensor], ghost: Optional[Tensor], like: Tensor) -> Tensor:
    """The (rows, G, C, K*K) float32 buffer as the gradient of ``ghost`` (its shape and dtype); empty for None."""
    if buffer is None or ghost is None:
        return like.new_empty(0)
    if ghost.dim() == 4:  # shared by the batch: one row, or B rows when the other ghost was per sample
        buffer = buffer.sum(0)
    return buffer.reshape(ghost.shape).to(ghost.dtype)
