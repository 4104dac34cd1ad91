"""CPU: the ``native`` backend against the unfold ``reference`` at ELSA-Swin-T's stage-1 shape.

Shape (the core-library issue's yardstick): batch 8, 96 channels in 3 heads (N = 24, C = 32), 56x56, K = 7,
additive ghost only (lam = 0, gamma = 1, as ELSA-Swin), float32. Measured side by side in one run:

- forward+backward wall time (median over repeats, after one warm-up), for every gradient (v, attn, ghost);
- peak memory the op adds over its inputs: the resident set before the call (VmRSS) against its high-water mark
  (VmHWM) during the call, reset just before it through /proc/self/clear_refs (Linux).

    python benchmarks/cpu_native_bench.py [--batch 8] [--repeats 15] [--json benchmarks/results/cpu_native_bench.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HEADS, CHANNELS, SIDE, K = 3, 96, 56, 7


def make_inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    n, c = batch * HEADS, CHANNELS // HEADS
    v = torch.randn(n, c, SIDE, SIDE, generator=g).requires_grad_()
    attn = torch.randn(n, K * K, SIDE, SIDE, generator=g).softmax(1).requires_grad_()
    add = (torch.randn(n, c, K, K, generator=g) * 0.02).requires_grad_()
    grad = torch.randn(n, c, SIDE, SIDE, generator=g)
    return v, attn, add, grad


def forward_backward(backend: str, v, attn, add, grad) -> None:
    from elsa.ops import elsa_aggregate

    out = elsa_aggregate(v, attn, None, add, kernel_size=K, backend=backend)
    torch.autograd.grad(out, (v, attn, add), grad)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(backend: str, inputs) -> float:
    """Peak resident memory (MiB) one forward+backward adds over what the process holds before it."""
    forward_backward(backend, *inputs)  # warm-up: one-time allocations are not the op's
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    forward_backward(backend, *inputs)
    return _status_mib("VmHWM") - before


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_time(backend: str, inputs, repeats: int) -> float:
    forward_backward(backend, *inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward_backward(backend, *inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "cpu_native_bench.json"))
    args = parser.parse_args(argv)

    inputs_mib = sum(t.numel() * t.element_size() for t in make_inputs(args.batch)) / 2 ** 20
    rows = {}
    for backend in ("reference", "native"):
        inputs = make_inputs(args.batch)
        memory = measure_memory(backend, inputs)
        ms = measure_time(backend, inputs, args.repeats)
        rows[backend] = dict(fwd_bwd_ms=round(ms, 1), peak_added_mib=round(memory, 1))
    result = dict(
        benchmark="cpu_native_bench", date=datetime.date.today().isoformat(), device=cpu_name(),
        cpu_count=torch.get_num_threads(), torch=torch.__version__,
        shape=dict(batch=args.batch, heads=HEADS, channels=CHANNELS, side=SIDE, kernel_size=K, ghost="add",
                   dtype="float32", inputs_mib=round(inputs_mib, 1)),
        results=rows,
        speedup=round(rows["reference"]["fwd_bwd_ms"] / rows["native"]["fwd_bwd_ms"], 2),
        memory_ratio=round(rows["reference"]["peak_added_mib"] / max(rows["native"]["peak_added_mib"], 1e-3), 1),
    )
    print(f"{'backend':<10} {'fwd+bwd (ms)':>13} {'peak added (MiB)':>17}")
    for name, r in rows.items():
        print(f"{name:<10} {r['fwd_bwd_ms']:>13.1f} {r['peak_added_mib']:>17.1f}")
    print(f"native: {result['speedup']}x faster, {result['memory_ratio']}x less added peak memory "
          f"(inputs {inputs_mib:.1f} MiB)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
