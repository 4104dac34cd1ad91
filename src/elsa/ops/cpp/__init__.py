"""Compiled CPU backend: one C++/OpenMP pass per output pixel with the K*K loop inside (``kernel.cpp``),
built once per machine at first use (``build.py``), registered as custom ops (``op.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def why_not(v: Tensor) -> Optional[str]:
    """None when the compiled CPU kernel can run on tensors like ``v``, else the reason."""
    if v.device.type != "cpu":
        return f"runs on CPU tensors, got {v.device}"
    if v.dtype not in DTYPES:
        return f"supports float32, float64 and bfloat16, got {v.dtype}"
    return _build_failure() or None


@torch.compiler.assume_constant_result
def _build_failure() -> str:
    """Why the kernel cannot be built or loaded ("" when it can). A constant to torch.compile, which must not
    trace the build (files, subprocesses) while it traces a model."""
    from . import build

    return "" if build.load() is not None else build.failure() or "the compiled CPU kernel is unavailable"
