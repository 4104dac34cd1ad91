"""FLOP counting that sees the ELSA custom ops, in the papers' convention (multiply-accumulates).

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions (2 FLOPs per multiply-accumulate)
but an opaque custom op counts 0. This module registers formulas for the ELSA ops (``elsa::native_aggregate``
and its backward, and the Triton ops ``elsa::triton_*`` once they are loaded) with ``register_flop_formula``,
and ``count_flops`` reports **MACs**, the unit in which the ELSA, Swin and VOLO papers (and fvcore, and
timm's model tables) quote "FLOPs": ELSA-Swin-T 4.8 G, Swin-T 4.5 G, VOLO-D1 6.8 G.

Convention for the aggregation: one MAC per output element and neighbour, ``N * C * Ho * Wo * K * K`` (as a
depthwise convolution or VOLO's ``attn @ v``), plus the same again when a ghost head is present, for making the
per-channel filter ``m * a + d`` (a dynamic filter of the same size as the aggregation). The softmax is not
counted (fvcore's convention). This is the count that reproduces the paper's 4.8 G for ELSA-Swin-T: 4.77 G
(4.70 G without the filter term). A backward op counts one forward's worth per gradient it produces.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = ["count_flops", "register_elsa_flop_formulas", "aggregate_macs"]

_log = logging.getLogger(__name__)

# Names the ELSA ops are registered under (elsa::<name>). The Triton ones exist only once
# elsa.ops.triton.op has been imported, which needs triton; they are looked up, never required.
_FORWARD_OPS = ("native_aggregate", "cpp_aggregate", "triton_aggregate", "triton_softmax_aggregate")
_BACKWARD_OPS = ("native_aggregate_backward", "cpp_aggregate_backward", "triton_aggregate_backward")


def aggregate_macs(out_shape: Sequence[int], kernel_size: int, ghost: bool = True) -> int:
    """MACs of one aggregation producing ``out_shape`` = (N, C, Ho, Wo) with a K x K neighbourhood;
    ``ghost``: a ghost head is present (the filter m * a + d is built per channel: twice the work)."""
    return math.prod(int(s) for s in out_shape) * kernel_size * kernel_size * (2 if ghost else 1)


def _has_ghost(args: tuple, kwargs: dict, first: int) -> bool:
    mul = kwargs.get("ghost_mul", args[first] if len(args) > first else None)
    add = kwargs.get("ghost_add", args[first + 1] if len(args) > first + 1 else None)
    return mul is not None or add is not None


def _kernel_size(args: tuple, kwargs: dict, position: int) -> int:
    k = kwargs.get("kernel_size", args[position] if len(args) > position else None)
    if not isinstance(k, int):
        raise TypeError(f"ELSA op called without an int kernel_size (got {k!r}); cannot count its FLOPs")
    return k


def _forward_formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # schema: (v, attn, ghost_mul, ghost_add, kernel_size, dilation, stride, ...) -> out; shapes replace tensors
    return 2 * aggregate_macs(out_shape, _kernel_size(args, kwargs, 4), _has_ghost(args, kwargs, 2))


def _backward_formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # schema: (grad, v, attn, ghost_mul, ghost_add, kernel_size, ...) -> (gv, ga, gm, gd); empty = not asked for
    grad_shape = args[0] if args else kwargs["grad"]
    produced = sum(1 for s in out_shape if s is not None and math.prod(s) > 0)
    return 2 * produced * aggregate_macs(grad_shape, _kernel_size(args, kwargs, 5), _has_ghost(args, kwargs, 3))


def _fused_conv_formula(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # oneDNN's convolution with a fused activation, which the ELSA layer runs in CPU inference: a convolution's count
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _fused_linear_formula(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # oneDNN's linear with its bias (and GELU) fused, which the ELSA layers run in CPU inference: a matmul's count,
    # bias not counted (as PyTorch's addmm formula)
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _packet(name: str) -> Optional[torch._ops.OpOverloadPacket]:
    try:
        return getattr(torch.ops.elsa, name)
    except (AttributeError, RuntimeError):
        return None


def register_elsa_flop_formulas() -> list[str]:
    """Register FLOP formulas for every ELSA op loaded now (idempotent); returns the op names covered.

    Why lazily: the Triton ops are defined only when their module imports (GPU machines); calling this again
    after that import adds them. Registration is global, so a plain ``FlopCounterMode`` then sees them too."""
    covered = []
    for names, formula in ((_FORWARD_OPS, _forward_formula), (_BACKWARD_OPS, _backward_formula)):
        for name in names:
            packet = _packet(name)
            if packet is None:
                continue
            if packet not in flop_registry:
                register_flop_formula(packet)(formula)
            covered.append(name)
    for name, formula in (("_convolution_pointwise", _fused_conv_formula), ("_linear_pointwise", _fused_linear_formula)):
        fused = getattr(torch.ops.mkldnn, name, None) if hasattr(torch.ops, "mkldnn") else None
        if fused is not None and fused not in flop_registry:
            register_flop_formula(fused)(formula)
    return covered


def _load_triton_ops() -> None:
    """Import the Triton ops so their formulas exist before a CUDA forward picks them; absent Triton is fine."""
    try:
        importlib.import_module("elsa.ops.triton.op")
    except Exception as err:  # ImportError, or a triton that fails at import time: then they cannot run either
        _log.debug("Triton ELSA ops not loaded (%s); counting the native op only", err)


def count_flops(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    device: Optional[torch.device | str] = None,
    forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a zero input of ``input_size`` (papers' "FLOPs").

    Args:
        model: any module; ELSA custom ops are counted by their formula, matmuls/convs by PyTorch's.
        input_size: (B, C, H, W) of the input; the count grows linearly with B.
        device: where the input is made (default: the model's parameters' device). A model built on the
            ``meta`` device is counted without computing anything, which makes large models cheap to count.
        forward: ``forward(model, x)`` to count instead of ``model(x)`` (e.g. ``forward_features``).

    Returns:
        MACs as an int (FlopCounterMode's FLOPs / 2).
    """
    if len(input_size) != 4 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"input_size must be 4 positive ints (B, C, H, W), got {tuple(input_size)}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        _load_triton_ops()
    register_elsa_flop_formulas()
    # On the meta device the dispatcher picks the native op (it has a fake implementation and a formula here).
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(tuple(int(s) for s in input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if forward is None:
                model(x)
            else:
                forward(model, x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
