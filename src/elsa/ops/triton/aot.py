"""Compile the ELSA kernels for a CUDA architecture without a GPU (Triton ships ptxas).

Used by the test that the kernels compile for sm_90 (the interpreter accepts code the GPU compiler rejects)
and by ``benchmarks/kernel_sass.py``, which reads the machine code. Needs kernels defined for real, i.e. a
process started without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointer arguments that are float32 whatever the input dtype: the ghost-gradient accumulators and the lse.
FLOAT32_POINTERS = frozenset({"gm_ptr", "gd_ptr", "lse_ptr"})


def compile_for(fn: triton.JITFunction, constexprs: dict, *, dtype: str = "bf16", num_warps: int = 4,
                arch: int = 90):
    """``fn`` compiled for compute capability ``arch`` (90: H100/H200) with the given constexprs, every other
    pointer of ``dtype`` ("bf16", "fp16", "fp32") and every integer argument i32. Returns Triton's compiled
    kernel: ``.asm["ptx"]``, ``.asm["cubin"]``."""
    signature = {name: "constexpr" if name in constexprs else
                 ("*fp32" if name in FLOAT32_POINTERS else f"*{dtype}") if name.endswith("_ptr") else "i32"
                 for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))
