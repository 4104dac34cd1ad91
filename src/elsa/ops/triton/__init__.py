"""Triton backend: fused GPU kernels for ELSA aggregation (see ``kernels.py`` and ``op.py``)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor


def why_not(v: Tensor) -> Optional[str]:
    """None when the Triton backend can run on tensors like ``v``, else the reason.

    CUDA tensors run compiled kernels; CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1
    both now and when the kernels were first imported (Triton decides how to run a kernel when it is defined).
    """
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not importable ({err})"
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # The kernels compute in float32: float64 would silently lose precision.
        return f"supports float32, float16 and bfloat16, got {v.dtype}"
    on_cpu = v.device.type == "cpu"
    if not (v.is_cuda or (on_cpu and os.environ.get("TRITON_INTERPRET") == "1")):
        # Checked before importing the kernels, so that they are never defined in the wrong mode by this check.
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {v.device}"
    try:
        from . import op
    except ImportError as err:
        return f"the Triton kernels are not available ({err})"
    if on_cpu and not op.INTERPRET:
        return "TRITON_INTERPRET=1 was set after the Triton kernels were imported; set it before importing them"
    return None
