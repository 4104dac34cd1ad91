"""CPU float32 inference through oneDNN's fused linear: what inductor emits and eager PyTorch does not.

Eager ``F.linear`` on a CPU copies the broadcast bias into the output before the matmul (the ``aten::copy_``
inside ``addmm``) and runs a following GELU as a pass of its own; oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``) adds the bias and applies the GELU in the matmul's epilogue. Same values
up to summation order. Taken only where that is safe: CPU float32 without autocast, no autograd (the op has no
backward), eager mode (compilers, exporters and tracers see the plain ops), oneDNN present. Weights are used as
stored: no prepacked copy, so nothing to invalidate when parameters change and ``state_dict`` is untouched
(prepacking measured no faster at ELSA-Swin's shapes).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as _TimmMlp
from torch import Tensor

_HAS_FUSED_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _tracing() -> bool:
    return (torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


def inference_fusable(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether a oneDNN fused op may replace the eager ops on input ``x`` with parameters ``params``."""
    if _tracing() or not isinstance(x, Tensor):
        return False
    tensors = [x, *(p for p in params if p is not None)]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, followed by the exact (erf) GELU when ``gelu``; fused by oneDNN in CPU
    float32 inference, the eager ops otherwise."""
    if _HAS_FUSED_LINEAR and inference_fusable(x, weight, bias) and x.dim() >= 2:  # asked first: fx proxies
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state_dict) whose CPU float32 inference adds the bias inside the matmul."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Mlp(_TimmMlp):
    """timm's ``Mlp`` (same arguments, parameters and state_dict) whose CPU float32 inference runs fc1 + bias + GELU
    as one oneDNN op and fc2 + bias as another."""

    def forward(self, x: Tensor) -> Tensor:
        act = self.act
        if not (isinstance(self.fc1, nn.Linear) and type(act) is nn.GELU and act.approximate == "none"):
            return super().forward(x)
        x = self.drop1(linear(x, self.fc1.weight, self.fc1.bias, gelu=True))
        return self.drop2(linear(self.norm(x), self.fc2.weight, self.fc2.bias))
