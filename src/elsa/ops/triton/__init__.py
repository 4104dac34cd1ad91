"""Triton backend: fused GPU kernels for ELSA aggregation (see ``kernels.py`` and ``op.py``)."""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor


def why_not(v: Tensor) -> Optional[str]:
    """None when the Triton backend can run on tensors like ``v``, else the reason."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not importable ({err})"
    try:
        from . import op
    except ImportError as err:
        return f"the Triton kernels are not available ({err})"
    if v.is_cuda:
        return None
    if v.device.type == "cpu" and op.INTERPRET:
        return None
    if v.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        # Triton decides between compiled and interpreted kernels when they are defined (on first import).
        return "TRITON_INTERPRET=1 was set after the Triton kernels were imported; set it before importing elsa"
    return f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {v.device}"
