"""Op-level benchmark of ELSA aggregation at the ELSA-Swin-T stage shapes.

For each stage (224 input: 56x56x96 / 3 heads, 28x28x192 / 6 heads, 14x14x384 / 12 heads; K = 7, stride 1,
dilation 1, additive ghost only as ELSA-Swin uses: lam = 0, gamma = 1), each dtype, each entry point
(``aggregate``: ``elsa_aggregate`` with a softmaxed map, ``softmax_aggregate``: ``elsa_softmax_aggregate`` with
logits, both in the flat form; ``softmax_heads``: ``elsa_softmax_aggregate(..., num_heads=G)`` as the ELSA layer
calls it) and each backend (triton on CUDA only, native, reference), it measures:

- forward time and forward+backward time (median of repeated runs; flat inputs are contiguous (N, C, H, W) with
  N = batch * heads and C = channels / heads = 32; head-aware inputs are what the layer's projections write:
  v a channel slice of a channels-last (batch, H, W, 2*dim_qk + channels) map, logits (batch, H, W, G*K*K)
  viewed as (batch, G*K*K, H, W), one ghost per head, the output gradient channels-last);
- peak memory allocated by one forward+backward beyond its inputs (CUDA only: torch.cuda.max_memory_allocated;
  null on CPU);
- achieved bandwidth: the bytes the op must move at minimum (read v, attention, ghost; write out; and for
  the backward read grad, v, attention, ghost; write the three gradients) divided by the time, also as a
  fraction of the device's copy bandwidth measured with a large tensor copy.

A backend that runs out of memory or fails is recorded with its error instead of figures.

    python benchmarks/op_bench.py --device cuda                    # batch 128, float32 and bfloat16
    python benchmarks/op_bench.py --device cpu --batch 2           # native and reference only

Writes JSON (device name, torch/triton versions, date, arguments, every figure) to
benchmarks/results/op_bench_<device>.json unless --json says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import elsa  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# (name, H = W, channels, heads) of ELSA-Swin-T's ELSA stages at 224x224 input.
STAGES = [("stage1", 56, 96, 3), ("stage2", 28, 192, 6), ("stage3", 14, 384, 12)]
KERNEL_SIZE = 7
ENTRIES = ("aggregate", "softmax_aggregate", "softmax_heads")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, budget_s: float, max_reps: int = 50) -> float:
    """Median wall time of ``fn`` in milliseconds: one warm-up call, then as many as fit in ``budget_s``."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written per second) from a large tensor copy."""
    nbytes = (1 << 30) if device == "cuda" else (1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def min_bytes(n: int, c: int, hw: int, kk: int, elem: int, backward: bool) -> int:
    """Bytes the op must read and write at least: ghost_add only, stride 1 (Ho*Wo = H*W)."""
    v, attn, ghost, out = n * c * hw, n * kk * hw, n * c * kk, n * c * hw
    fwd = v + attn + ghost + out
    # backward: read grad, v, attn, ghost; write grad_v, grad_attn, grad_ghost
    bwd = out + v + attn + ghost + v + attn + ghost
    return (fwd + (bwd if backward else 0)) * elem


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _head_inputs(batch: int, heads: int, c: int, side: int, dtype: torch.dtype, device: str, gen) -> tuple:
    """(qkv, logits, ghost, grad) as the ELSA layer hands them to the operator: v is the last heads * c channels
    of the channels-last qkv map (see the module docstring)."""
    kk, gc = KERNEL_SIZE * KERNEL_SIZE, heads * c
    qkv = torch.randn(batch, side, side, 2 * (gc // 3 * 2) + gc, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(batch, side, side, heads * kk, device=device, dtype=dtype, generator=gen).permute(0, 3, 1, 2)
    ghost = torch.randn(heads, c, KERNEL_SIZE, KERNEL_SIZE, device=device, dtype=dtype, generator=gen) * 0.02
    grad = torch.randn(batch, side, side, gc, device=device, dtype=dtype, generator=gen).permute(0, 3, 1, 2)
    return qkv, logits, ghost, grad


def bench_case(backend: str, entry: str, batch: int, heads: int, c: int, hw_side: int, dtype: torch.dtype,
               device: str, budget_s: float) -> dict:
    from elsa.ops import elsa_aggregate, elsa_softmax_aggregate

    kk = KERNEL_SIZE * KERNEL_SIZE
    n = batch * heads
    gen = torch.Generator(device=device).manual_seed(0)
    if entry == "softmax_heads":
        first, attn, ghost, grad = _head_inputs(batch, heads, c, hw_side, dtype, device, gen)
        v_of = lambda qkv: qkv[..., -heads * c:].permute(0, 3, 1, 2)  # noqa: E731 - a view, as in the layer
        geometry = dict(kernel_size=KERNEL_SIZE, num_heads=heads, backend=backend)
    else:
        first = torch.randn(n, c, hw_side, hw_side, device=device, dtype=dtype, generator=gen)
        logits = torch.randn(n, kk, hw_side, hw_side, device=device, dtype=dtype, generator=gen)
        attn = logits if entry == "softmax_aggregate" else logits.softmax(1)
        ghost = (torch.randn(1, c, KERNEL_SIZE, KERNEL_SIZE, device=device, dtype=dtype, generator=gen) * 0.02
                 ).expand(n, -1, -1, -1).contiguous()
        grad = torch.randn(n, c, hw_side, hw_side, device=device, dtype=dtype, generator=gen)
        v_of = lambda v: v  # noqa: E731
        geometry = dict(kernel_size=KERNEL_SIZE, backend=backend)
    fn = elsa_aggregate if entry == "aggregate" else elsa_softmax_aggregate
    # clone keeps the (channels-last) strides of these dense tensors
    leaves = [t.detach().clone().requires_grad_() for t in (first, attn, ghost)]

    def forward():
        with torch.no_grad():
            return fn(v_of(first), attn, None, ghost, **geometry)

    def forward_backward():
        out = fn(v_of(leaves[0]), leaves[1], None, leaves[2], **geometry)
        return torch.autograd.grad(out, leaves, grad)

    result: dict = {}
    try:
        result["fwd_ms"] = time_fn(forward, device, budget_s)
        result["fwd_bwd_ms"] = time_fn(forward_backward, device, budget_s)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward()
            torch.cuda.synchronize()
            result["fwd_bwd_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward()
            torch.cuda.synchronize()
            result["fwd_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            result["fwd_bwd_peak_mib"] = None
            result["fwd_peak_mib"] = None
    except Exception as err:  # noqa: BLE001 - a failing backend is a result, not a crash
        result = {"error": "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"[:300]}
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=128, help="images per batch (N = batch * heads)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated; default float32,bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default triton,native,reference on cuda, native,reference on cpu")
    parser.add_argument("--entries", default=",".join(ENTRIES), help="aggregate and/or softmax_aggregate")
    parser.add_argument("--stages", default=",".join(s[0] for s in STAGES))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed runs per measurement (default 0.5 cuda, 2 cpu)")
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/op_bench_<device>.json)")
    args = parser.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    dtypes = args.dtypes or ("float32,bfloat16" if device == "cuda" else "float32")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    backends = (args.backends or ("triton,native,reference" if device == "cuda" else "native,reference")).split(",")
    entries = args.entries.split(",")
    stages = [s for s in STAGES if s[0] in args.stages.split(",")]
    budget = args.budget if args.budget is not None else (0.5 if device == "cuda" else 2.0)
    name = device_name(device)
    slug = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out_path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / f"op_bench_{slug}.json"

    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    copy_gbs = copy_bandwidth(device)
    print(f"device: {name}; copy bandwidth {copy_gbs:.1f} GB/s; batch {args.batch}; K={KERNEL_SIZE}, ghost_add only")
    rows = []
    header = (f"{'stage':<7} {'dtype':<9} {'entry':<18} {'backend':<10} {'fwd ms':>9} {'f+b ms':>9} "
              f"{'peak MiB':>9} {'fwd BW':>7} {'f+b BW':>7}")
    print(header)
    print("-" * len(header))
    for stage, side, channels, heads in stages:
        n, c = args.batch * heads, channels // heads
        for dtype in dtypes:
            elem = torch.finfo(dtype).bits // 8
            for entry in entries:
                for backend in backends:
                    res = bench_case(backend, entry, args.batch, heads, c, side, dtype, device, budget)
                    if device == "cuda":
                        torch.cuda.empty_cache()  # the case's tensors are freed; an OOM left nothing behind
                    row = dict(stage=stage, H=side, W=side, channels=channels, heads=heads, N=n, C=c,
                               kernel_size=KERNEL_SIZE, dtype=str(dtype).replace("torch.", ""), entry=entry,
                               backend=backend, **res)
                    if "error" not in res:
                        for key, backward in (("fwd", False), ("fwd_bwd", True)):
                            nbytes = min_bytes(n, c, side * side, KERNEL_SIZE ** 2, elem, backward)
                            gbs = nbytes / (res[f"{key}_ms"] * 1e-3) / 1e9
                            row[f"{key}_min_bytes"] = nbytes
                            row[f"{key}_gbs"] = gbs
                            row[f"{key}_bw_fraction"] = gbs / copy_gbs
                        peak = res["fwd_bwd_peak_mib"]
                        print(f"{stage:<7} {row['dtype']:<9} {entry:<18} {backend:<10} {res['fwd_ms']:>9.3f} "
                              f"{res['fwd_bwd_ms']:>9.3f} {'-' if peak is None else f'{peak:.0f}':>9} "
                              f"{row['fwd_bw_fraction']:>7.1%} {row['fwd_bwd_bw_fraction']:>7.1%}")
                    else:
                        print(f"{stage:<7} {row['dtype']:<9} {entry:<18} {backend:<10} {res['error']}")
                    sys.stdout.flush()
                    rows.append(row)

    report = dict(
        benchmark="op_bench",
        device=device,
        device_name=name,
        torch=torch.__version__,
        triton=_triton_version(),
        cuda=torch.version.cuda if device == "cuda" else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        args=vars(args),
        copy_bandwidth_gbs=copy_gbs,
        # CPU timings are only meaningful on an otherwise idle machine: the 1-minute load average at the start
        load_average=load_average,
        notes=("times are medians in ms; *_min_bytes: bytes the op must read+write at least; *_bw_fraction: "
               "achieved (min_bytes / time) over copy bandwidth; peak MiB: memory allocated beyond the inputs "
               "(CUDA only)"),
        results=rows,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
